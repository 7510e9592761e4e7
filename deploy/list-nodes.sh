#!/usr/bin/env bash
# Usage: deploy/list-nodes.sh [SUPERLINK_HOST:PORT CA_CERT]
#
# The SuperLink's SuperNodes with the organisation each belongs to: `flwr supernode list` (node
# id, status) joined with the record deploy/register-nodes.sh keeps in $FLWR_HOME/nodes.tsv
# (FLWR_HOME: see deploy/env.sh). One line per node under a header:
#   NODE_ID  STATUS  ORGANISATION  KEY_FINGERPRINT
# status: registered (never connected), online, offline, unregistered; "?" for a node that was
# not registered with register-nodes.sh from this FLWR_HOME. Without arguments it uses the
# connection register-nodes.sh wrote; with them, it writes that connection first.
set -euo pipefail
source "$(dirname "$0")/env.sh"
case "$#:${1:-}" in
    0:) [ -f "$FLWR_HOME/config.toml" ] || die "no SuperLink connection in $FLWR_HOME/config.toml: \
give SUPERLINK_HOST:PORT CA_CERT, or run deploy/register-nodes.sh first" ;;
    2:*) write_connection "$1" "$2" ;;
    *) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
reply="$(flwr supernode list deployment --format json)" || true
nodes="$(flwr_json '"\n".join(n["node-id"] + "\t" + n["status"] for n in reply["nodes"])' <<<"$reply")" \
    || die "flwr supernode list failed: $nodes"
records="$FLWR_HOME/nodes.tsv"   # NODE_ID ORGANISATION FINGERPRINT KEY_FILE; a node id's last record wins
[ -f "$records" ] || records=/dev/null
awk -F '\t' -v records="$records" '
    function row(id, status, org, fp) { printf "%-20s  %-12s  %-14s  %s\n", id, status, org, fp }
    BEGIN {
        while ((getline line < records) > 0) { split(line, f, "\t"); org[f[1]] = f[2]; fp[f[1]] = f[3] }
        row("NODE_ID", "STATUS", "ORGANISATION", "KEY_FINGERPRINT")
    }
    NF { row($1, $2, ($1 in org) ? org[$1] : "?", ($1 in fp) ? fp[$1] : "?") }' <<<"$nodes"
