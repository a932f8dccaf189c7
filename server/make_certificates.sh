#!/usr/bin/env bash
# Make a private CA and a SuperLink TLS certificate signed by it, for local trials.
#
#   server/make_certificates.sh DIR [NAME_OR_IP ...]
#
# Writes DIR/ca.crt (give it to every SuperNode and to flwr), DIR/ca.key (keep it
# private), DIR/server.crt and DIR/server.key (the SuperLink's). The certificate is
# valid for the names and addresses given (default: localhost 127.0.0.1 ::1); add
# the address your devices use to reach the server, e.g. 192.0.2.10 or fl.example.org.
# In production use certificates from your own CA instead of this script.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 DIR [NAME_OR_IP ...]" >&2
    exit 2
fi
dir=$1
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1 ::1)
san=""
for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
mkdir -p "$dir"
cd "$dir"
umask 077
openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 365 \
    -keyout ca.key -out ca.crt -subj "/CN=fedpeft trial CA" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -sha256 -keyout server.key -out server.csr \
    -subj "/CN=${names[0]}" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "${san%,}" >server.ext
openssl x509 -req -sha256 -days 365 -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.crt
echo "wrote $dir/ca.crt, ca.key, server.crt, server.key (valid for ${names[*]})"
