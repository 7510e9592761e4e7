#!/usr/bin/env bash
# Usage: deploy/make-node-keys.sh OUT_DIR NAME...
#
# One key pair per SuperNode: OUT_DIR/NAME (private, stays on that organisation's host) and
# OUT_DIR/NAME.pub (public, handed to the SuperLink operator for deploy/register-nodes.sh).
# Flower 1.42 reads OpenSSH-format keys on a NIST elliptic curve (here P-384, ecdsa-sha2-nistp384).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
out="$1"; shift
mkdir -p "$out"
for name in "$@"; do
    [ -e "$out/$name" ] && { echo "$out/$name exists; not overwritten" >&2; continue; }
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedtune-$name" -f "$out/$name"
    echo "$name: private $out/$name, public $out/$name.pub"
done
