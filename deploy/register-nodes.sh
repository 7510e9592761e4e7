#!/usr/bin/env bash
# Usage: deploy/register-nodes.sh SUPERLINK_HOST:PORT CA_CERT PUBLIC_KEY...
#
# Registers each SuperNode public key (NAME.pub from deploy/make-node-keys.sh) with the running
# SuperLink, through Flower's Control API (`flwr supernode register`), then lists the nodes.
# A SuperNode whose key is not registered is refused. Unregister with
#   flwr supernode unregister NODE_ID deployment   (FLWR_HOME as in deploy/env.sh)
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 3 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
write_connection "$1" "$2"; shift 2
for key in "$@"; do
    flwr supernode register "$key" deployment
done
flwr supernode list deployment
