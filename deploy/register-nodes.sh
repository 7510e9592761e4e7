#!/usr/bin/env bash
# Usage: deploy/register-nodes.sh SUPERLINK_HOST:PORT CA_CERT PUBLIC_KEY...
#
# Registers each SuperNode public key (NAME.pub from deploy/make-node-keys.sh) with the running
# SuperLink, through Flower's Control API (`flwr supernode register`), then lists the nodes with
# deploy/list-nodes.sh. A SuperNode whose key is not registered is refused.
# The organisation of a key is its file name without .pub (org0.pub: org0; rename the file to
# name it otherwise). `flwr supernode list` shows no owner, so each registration is recorded as
# NODE_ID, ORGANISATION, KEY_FINGERPRINT, KEY_FILE (tab-separated) in $FLWR_HOME/nodes.tsv
# (FLWR_HOME: see deploy/env.sh); the organisation is also the node's name on the SuperLink.
# A key registered before (nodes.tsv knows it) is skipped. Unregister a node with
#   deploy/flwr.sh supernode unregister NODE_ID deployment
set -euo pipefail
source "$(dirname "$0")/env.sh"
[ $# -ge 3 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
write_connection "$1" "$2"; shift 2
record="$FLWR_HOME/nodes.tsv"
# known_node FINGERPRINT -- the node id nodes.tsv last recorded for that key, or fails.
known_node() { awk -F '\t' -v fp="$1" '$3 == fp { id = $1 } END { if (id == "") exit 1; print id }' "$record" 2>/dev/null; }
for key in "$@"; do
    [ -f "$key" ] || die "no public key at $key (each organisation sends the NAME.pub of deploy/make-node-keys.sh)"
    org="$(basename "$key" .pub)"
    fingerprint="$(ssh-keygen -l -E sha256 -f "$key" 2>/dev/null | cut -d ' ' -f 2)" \
        || die "$key is not an OpenSSH public key (deploy/make-node-keys.sh writes NAME.pub)"
    reply="$(flwr supernode register "$key" deployment --name "$org" --format json)" || true
    if node_id="$(flwr_json 'reply["node-id"]' <<<"$reply")"; then
        printf '%s\t%s\t%s\t%s\n' "$node_id" "$org" "$fingerprint" "$(realpath "$key")" >> "$record"
        echo "$org: registered as node $node_id ($key, $fingerprint)"
    elif [[ "$node_id" == *"already in use"* ]] && known="$(known_node "$fingerprint")"; then
        echo "$org: the SuperLink already has this key, as node $known ($key, $fingerprint); skipped"
    elif [[ "$node_id" == *"already in use"* ]]; then
        die "could not register $key ($org): $node_id The SuperLink knows this key, but $record does not: \
it was registered from elsewhere, or unregistered (a key cannot be registered twice: make a new pair with deploy/make-node-keys.sh)"
    else
        die "could not register $key ($org): $node_id"
    fi
done
bash "$DEPLOY_DIR/list-nodes.sh"
