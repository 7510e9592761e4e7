#!/usr/bin/env bash
# Usage: deploy/supernode.sh SUPERLINK_HOST:PORT CA_CERT PRIVATE_KEY PARTITION_ID NUM_PARTITIONS [flower-supernode options...]
#
# Starts one organisation's client: Flower's SuperNode, connecting over HTTPS (verified against
# CA_CERT) to the SuperLink and authenticating with PRIVATE_KEY (its public key must have been
# registered with deploy/register-nodes.sh). PARTITION_ID (0..NUM_PARTITIONS-1) picks this
# client's share of the data; NUM_PARTITIONS must equal the run's federation.num_clients.
# Runs in the foreground; stop it with Ctrl-C / SIGTERM. When the SuperLink refuses the key
# (not registered), it says so after Flower's message and exits with status 1.
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

# Flower 1.42 reports a refused key (the SuperLink answers ActivateNode with HTTP 412, "No
# SuperNode found with the given public key" in its own log only) as "[code: 2004] Failed to
# activate SuperNode." followed by its generic "could not establish a connection" (exit code
# 305), which reads like a network failure. flower-supernode's log passes through unchanged; after
# that block, this says what it means, once. Other failures keep Flower's words.
pub="$key.pub" make_pub=""
[ -f "$pub" ] || make_pub=" (make it with: ssh-keygen -y -f $key > $pub)"
refusal="$(basename "$0"): this node's public key is not registered; register it with \
deploy/register-nodes.sh $superlink CA_CERT $pub$make_pub, run by the SuperLink's operator, then start \
this node again. The SuperLink at $superlink refused the key: Flower's \"could not establish a connection\" above is \
that refusal, not a network failure (a key in use by a SuperNode already online is refused alike)."
explain_refusal() {
    local line refused=0
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s\n' "$line"
        case "$line" in
            *"[code: 2004]"*) [ "$refused" != 0 ] || refused=1 ;;
            *"For more information, visit:"*) if [ "$refused" = 1 ]; then printf '%s\n' "$refusal"; refused=2; fi ;;
        esac
    done
    if [ "$refused" = 1 ]; then printf '%s\n' "$refusal"; fi
}

# exec: signals reach flower-supernode itself. The filter ignores them and ends with its input.
exec flower-supernode \
    --superlink "$superlink" --root-certificates "$ca" \
    --auth-supernode-private-key "$key" \
    --node-config "partition-id=$partition num-partitions=$partitions${NODE_CONFIG:+ $NODE_CONFIG}" \
    --port "${SUPERNODE_PORT:-9094}" \
    "$@" 2> >(trap '' INT TERM HUP; explain_refusal >&2)
