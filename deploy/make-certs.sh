#!/usr/bin/env bash
# Usage: deploy/make-certs.sh OUT_DIR [HOSTNAME_OR_IP...]
#
# A private certificate authority (OUT_DIR/ca.key, OUT_DIR/ca.crt) and the SuperLink's TLS
# certificate signed by it (OUT_DIR/server.key, OUT_DIR/server.crt), valid for localhost,
# 127.0.0.1 and every HOSTNAME_OR_IP given: list each name SuperNodes and operators use to
# reach the SuperLink. Give ca.crt (never ca.key) to every SuperNode and to whoever submits runs.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
out="$1"; shift
mkdir -p "$out"
umask 077

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then sans+=",IP:$name"; else sans+=",DNS:$name"; fi
done

openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes -subj "/CN=fedtune SuperLink CA" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=${1:-localhost}" \
    -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -sha256 -days 825 -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -out "$out/server.crt" \
    -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$sans") 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.crt"
echo "CA: $out/ca.crt; SuperLink certificate: $out/server.crt ($sans)"
