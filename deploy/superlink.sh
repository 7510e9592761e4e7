#!/usr/bin/env bash
# Usage: deploy/superlink.sh CERT_DIR [flower-superlink options...]
#
# Starts the coordinator: Flower's SuperLink with TLS (CERT_DIR from deploy/make-certs.sh) and
# SuperNode authentication (only SuperNodes whose public key was registered with
# deploy/register-nodes.sh may connect). Runs in the foreground; stop it with Ctrl-C / SIGTERM.
#
#   SUPERLINK_HOST  interface to listen on (default 0.0.0.0: every interface)
#   SUPERLINK_PORT  the one HTTPS port of the Fleet, Control and Runtime APIs (default 8000)
#   SUPERLINK_DB    SQLite file for the SuperLink's state, registered nodes included
#                   (default $FLWR_HOME/superlink.db; ":flwr-in-memory:" keeps it in memory)
# Extra options go to flower-superlink as they are, e.g. --log-file superlink.log.
# The ServerApp runs in a subprocess of this SuperLink, in this script's working directory:
# relative output.dir paths are relative to it.
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 1 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
certs="$1"; shift
for f in ca.crt server.crt server.key; do [ -f "$certs/$f" ] || die "missing $certs/$f (run deploy/make-certs.sh)"; done
mkdir -p "$FLWR_HOME"
exec flower-superlink \
    --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --host "${SUPERLINK_HOST:-0.0.0.0}" --port "${SUPERLINK_PORT:-8000}" \
    --database "${SUPERLINK_DB:-$FLWR_HOME/superlink.db}" \
    --disable-runtime-dependency-installation \
    "$@"
