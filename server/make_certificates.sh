#!/usr/bin/env bash
# Make a private CA and a SuperLink TLS certificate signed by it, for local trials.
#
#   server/make_certificates.sh [--force] [--ca-key-dir KEYDIR] DIR [NAME_OR_IP ...]
#
# Writes DIR/ca.crt (public, not a secret: give it to every SuperNode and to flwr),
# DIR/server.crt and DIR/server.key (the SuperLink's; DIR is what
# server/start_superlink.sh --certs reads), and the CA's private key to
# KEYDIR/ca.key (default: ca-private/ beside DIR; folder 0700, key 0600). Whoever holds
# ca.key can make certificates every device trusts: it never goes in DIR, and after
# this script it is needed only to issue the next server certificate, so move it
# offline if you can.
# The certificate is valid for the names and addresses given plus localhost, 127.0.0.1
# and ::1 (the operator's Control address and the Fleet gateway's upstream are on
# loopback); add the address your devices use, e.g. 192.0.2.10 or fl.example.org.
# An existing CA is never replaced silently: devices trust it, so a new one cuts them
# off. --force replaces it. In production use certificates from your own CA instead.
set -euo pipefail
usage="usage: $0 [--force] [--ca-key-dir KEYDIR] DIR [NAME_OR_IP ...]"
force=0 key_dir=""
while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1; shift ;;
        --ca-key-dir) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; key_dir=$2; shift 2 ;;
        -*) echo "$0: unknown option $1" >&2; echo "$usage" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -lt 1 ]; then
    echo "$usage" >&2
    exit 2
fi
dir=$1
shift
names=("$@")
key_dir=${key_dir:-$(dirname "$dir")/ca-private}
existing=()
for f in "$dir/ca.crt" "$dir/ca.key" "$key_dir/ca.key" "$dir/server.crt" "$dir/server.key"; do
    [ -e "$f" ] && existing+=("$f")
done
if [ ${#existing[@]} -gt 0 ] && [ $force -eq 0 ]; then
    echo "$0: refusing to replace ${existing[*]}" >&2
    if [ -f "$dir/ca.crt" ]; then
        echo "  the CA there: $(openssl x509 -in "$dir/ca.crt" -noout -subject -enddate 2>/dev/null | tr '\n' ' ')" >&2
    fi
    echo "  Devices that trust this CA would be cut off by a new one. Pass --force to replace it," \
        "or give another DIR." >&2
    exit 2
fi
if [ -e "$dir/ca.key" ]; then
    rm -f "$dir/ca.key"  # an earlier version's layout (--force given): the key leaves DIR
fi
all=(localhost 127.0.0.1 ::1 "${names[@]}")
san="" seen=" "
for name in "${all[@]}"; do
    [[ $seen == *" $name "* ]] && continue
    seen+="$name "
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
cn=${names[0]:-localhost}
mkdir -p "$dir"
umask 077
mkdir -p "$key_dir"
chmod 700 "$key_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 365 \
    -keyout "$work/ca.key" -out "$work/ca.crt" -subj "/CN=fedpeft trial CA" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -sha256 -keyout "$work/server.key" -out "$work/server.csr" \
    -subj "/CN=$cn" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "${san%,}" >"$work/server.ext"
openssl x509 -req -sha256 -days 365 -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -CAcreateserial -out "$work/server.crt" -extfile "$work/server.ext" 2>/dev/null
chmod 644 "$work/ca.crt" "$work/server.crt"
chmod 600 "$work/ca.key" "$work/server.key"
mv -f "$work/ca.key" "$key_dir/ca.key"
mv -f "$work/ca.crt" "$work/server.crt" "$work/server.key" "$dir/"
echo "wrote $dir/ca.crt (public: give it to every device and to flwr), $dir/server.crt and" \
    "$dir/server.key (the SuperLink's; valid for ${seen:1:${#seen}-2})"
echo "wrote $key_dir/ca.key (the CA's private key, 0600: not for the SuperLink; keep it offline if you can)"
