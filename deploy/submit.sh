#!/usr/bin/env bash
# Usage: deploy/submit.sh SUPERLINK_HOST:PORT CA_CERT CONFIG_YAML [KEY=VALUE...]
#
# Submits a fedtune run to the SuperLink with Flower's CLI (`flwr run .` from the repository
# root, which packages the app), streams its log until it ends, and exits non-zero unless the
# SuperLink reports the run `finished:completed`. CONFIG_YAML is read by the ServerApp and the
# ClientApps (a path valid on every host, or "" for the embedded default); KEY=VALUE pairs
# override it, e.g. federation.num_rounds=3 output.dir=/srv/fedtune/runs/r1 (values without
# single quotes). The run directory (config.yaml, metrics.jsonl, adapter/) is written on the
# SuperLink host. Exits non-zero, with the cause as its last line, whenever the run did not
# complete: not submitted, failed, stopped, or its status unknown.
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 3 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
write_connection "$1" "$2"
config="$3"; shift 3
cd "$REPO_DIR"
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
flwr_status=0
flwr run . deployment --stream --run-config "config-file='$config' overrides='$*'" | tee "$log" || flwr_status=$?
run_id="$(sed -n 's/^Successfully started run \([0-9]*\).*/\1/p' "$log" | head -n 1)"
[ -n "$run_id" ] || die "the run was not started (flwr run exited with status $flwr_status; its error is above)"

# `flwr run --stream` exits 0 however the run ended: ask the SuperLink how it did.
for _ in $(seq 30); do
    reply="$(flwr ls deployment --run-id "$run_id" --format json)" || true
    status="$(flwr_json '(reply["runs"] or [{}])[0].get("status", "unknown")' <<<"$reply")" \
        || die "run $run_id: could not ask the SuperLink how it ended: $status"
    [[ "$status" == finished:* ]] && break
    sleep 1
done
echo "run $run_id: $status"
case "$status" in
    finished:completed) ;;
    finished:*) die "run $run_id did not complete: $(flwr_json '(reply["runs"] or [{}])[0].get("status-details", "")' <<<"$reply")" ;;
    *) die "run $run_id has not finished ($status) although its log stream ended (flwr run exit status \
$flwr_status); re-attach with \
deploy/flwr.sh log $run_id deployment --stream, or stop it with deploy/flwr.sh stop $run_id deployment" ;;
esac
