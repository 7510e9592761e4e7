#!/usr/bin/env bash
# Run the app through Flower's own CLI and exit with the run's status:
#
#   bash simulations/flwr-run.sh [flwr run options]
#   bash simulations/flwr-run.sh --run-config "overrides='federation.num_rounds=2'"
#   bash simulations/flwr-run.sh --federation-config "num-supernodes=3"
#
# `flwr run . --stream` exits 0 however the run ends, and leaves the local SuperLink it starts
# (and, after a failure, the simulation under it) running in the background. This script asks
# the SuperLink how the run ended and exits 1 unless it completed (130 on Ctrl-C, after
# stopping the run), and on every path stops the SuperLink it started, with everything under it.
#
# FLWR_HOME defaults to .flwr/ here (a fresh one gets Flower's default connection). Without
# --federation-config the federation is the embedded default's: 4 SuperNodes, all cores each.
# The app runs in this environment: Flower would otherwise `uv sync` its dependencies into a new
# environment for every run (gigabytes: PyPI's Linux torch is the CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
flwr_bin="${FLWR:-flwr}"
# flwr starts `flower-superlink` by name: it must be on PATH beside flwr.
[[ "$flwr_bin" == */* ]] && export PATH="$(dirname "$flwr_bin"):$PATH"
mkdir -p "$FLWR_HOME"
# Earlier versions of this script wrote a config.toml with the `options.` fields that Flower 1.41
# and 1.42 deprecate; remove it, and flwr writes its default.
if head -n 1 "$FLWR_HOME/config.toml" 2>/dev/null | grep -qF 'Flower CLI connection config for `flwr run .`'; then
    rm -f "$FLWR_HOME/config.toml"
fi

# The SuperLink `flwr` starts for this FLWR_HOME keeps its state in this file.
superlink_pids() { pgrep -f -- "flower-superlink .*--database $FLWR_HOME/local-superlink/state.db" || true; }
descendants() {  # every process under PID $1, depth first
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}
stop_tree() {  # SIGTERM PID $1 and all under it; SIGKILL what is left after 10 s
    local pids left
    pids="$1 $(descendants "$1")"
    kill -TERM $pids 2>/dev/null
    for _ in $(seq 50); do
        left=""; for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
        [ -z "$left" ] && return 0
        sleep 0.2
    done
    kill -KILL $left 2>/dev/null
    return 0
}
before="$(superlink_pids)"
log="$(mktemp)"
run_id=""
cleanup() {
    local pid
    for pid in $(superlink_pids); do
        [[ " $before " == *" $pid "* ]] || stop_tree "$pid"
    done
    rm -f "$log"
}
started_run_id() { sed -n 's/^.*Successfully started run \([0-9][0-9]*\).*$/\1/p' "$log" | head -n 1; }
on_interrupt() {
    trap - INT TERM
    run_id="${run_id:-$(started_run_id)}"
    if [ -n "$run_id" ]; then
        echo "flwr-run: interrupted; stopping run $run_id (its run directory keeps the last checkpoint)" >&2
        "$flwr_bin" stop "$run_id" >/dev/null 2>&1
    fi
    exit 130
}
trap cleanup EXIT
trap on_interrupt INT TERM

args=("$@")
[[ " ${args[*]-} " == *" --federation-config "* ]] || \
    args+=(--federation-config "num-supernodes=4 client-resources-num-cpus=$(nproc)")
# Flower prints this on every simulation, whatever num-supernodes is: it says nothing about this run.
notice='Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.'
"$flwr_bin" run . --stream "${args[@]}" 2>&1 | grep --line-buffered -vF "$notice" | tee "$log"
run_id="$(started_run_id)"
[ -n "$run_id" ] || { echo "flwr-run: error: the run was not started (see the output above)" >&2; exit 1; }

# Ask the SuperLink how the run ended.
run_field() {
    "$flwr_bin" ls --run-id "$run_id" --format json 2>/dev/null |
        sed -n "s/^ *\"$1\": \"\(.*\)\",\{0,1\}$/\1/p" | head -n 1
}
status=""
for _ in $(seq 60); do
    status="$(run_field status)"
    [[ "$status" == finished:* ]] && break
    sleep 1
done
if [ "$status" != "finished:completed" ]; then
    # One line: Flower's reason with its line breaks (JSON "\n") folded, at most 400 characters.
    details="$(run_field status-details | sed 's/\\n/ /g; s/\\"/"/g; s/  */ /g' | cut -c 1-400)"
    echo "flwr-run: error: run $run_id ended ${status:-with an unknown status}: ${details:-see the log above}" >&2
    exit 1
fi
echo "flwr-run: run $run_id completed"
