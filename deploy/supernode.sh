#!/usr/bin/env bash
# Usage: deploy/supernode.sh SUPERLINK_HOST:PORT CA_CERT PRIVATE_KEY PARTITION_ID NUM_PARTITIONS [flower-supernode options...]
#
# Starts one organisation's client: Flower's SuperNode, connecting over HTTPS (verified against
# CA_CERT) to the SuperLink and authenticating with PRIVATE_KEY (its public key must have been
# registered with deploy/register-nodes.sh). PARTITION_ID (0..NUM_PARTITIONS-1) picks this
# client's share of the data; NUM_PARTITIONS must equal the run's federation.num_clients.
# Runs in the foreground; stop it with Ctrl-C / SIGTERM.
#
#   NODE_CONFIG      extra per-node settings, appended to the node config,
#                    e.g. NODE_CONFIG="model.quantization='4bit'"
#   SUPERNODE_PORT   this SuperNode's local Runtime API port (default 9094); every SuperNode
#                    on one host needs its own
# Extra options go to flower-supernode as they are, e.g. --max-retries 10 --max-wait-time 600.
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 5 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
superlink="$1" ca="$2" key="$3" partition="$4" partitions="$5"; shift 5
[ -f "$ca" ] || die "no CA certificate at $ca"
[ -f "$key" ] || die "no private key at $key (run deploy/make-node-keys.sh)"
exec flower-supernode \
    --superlink "$superlink" --root-certificates "$ca" \
    --auth-supernode-private-key "$key" \
    --node-config "partition-id=$partition num-partitions=$partitions${NODE_CONFIG:+ $NODE_CONFIG}" \
    --port "${SUPERNODE_PORT:-9094}" \
    "$@"
