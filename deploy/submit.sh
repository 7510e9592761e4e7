#!/usr/bin/env bash
# Usage: deploy/submit.sh SUPERLINK_HOST:PORT CA_CERT CONFIG_YAML [KEY=VALUE...]
#
# Submits a fedtune run to the SuperLink with Flower's CLI (`flwr run .` from the repository
# root, which packages the app), streams its log until it ends, and exits non-zero unless the
# SuperLink reports the run `finished:completed`. CONFIG_YAML is read by the ServerApp and the
# ClientApps (a path valid on every host, or "" for the embedded default); KEY=VALUE pairs
# override it, e.g. federation.num_rounds=3 output.dir=/srv/fedtune/runs/r1 (values without
# single quotes). The run directory (config.yaml, metrics.jsonl, adapter/) is written on the
# SuperLink host.
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 3 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
write_connection "$1" "$2"
config="$3"; shift 3
cd "$REPO_DIR"
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
flwr run . deployment --stream --run-config "config-file='$config' overrides='$*'" | tee "$log"
run_id="$(sed -n 's/^Successfully started run \([0-9]*\).*/\1/p' "$log" | head -n 1)"
[ -n "$run_id" ] || die "the run was not started"

# `flwr run --stream` exits 0 however the run ended: ask the SuperLink how it did.
run_field() { flwr ls deployment --run-id "$run_id" --format json | sed -n "s/^ *\"$1\": \"\(.*\)\",\{0,1\}$/\1/p" | head -n 1; }
for _ in $(seq 30); do
    status="$(run_field status)"
    [[ "$status" == finished:* ]] && break
    sleep 1
done
echo "run $run_id: $status"
[ "$status" == "finished:completed" ] || die "run $run_id did not complete: $(run_field status-details)"
