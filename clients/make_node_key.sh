#!/usr/bin/env bash
# Make a device's SuperNode key pair (ECDSA P-384, OpenSSH format, as Flower expects).
#
#   clients/make_node_key.sh PATH
#
# Writes PATH (the private key: it never leaves the device) and PATH.pub (send it to
# the server's operator, who registers it with server/register_supernodes.sh).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 PATH" >&2
    exit 2
fi
mkdir -p "$(dirname "$1")"
[ -e "$1" ] && { echo "$0: $1 exists; not overwriting a device key" >&2; exit 2; }
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$(basename "$1")" -f "$1"
echo "wrote $1 (private, keep on the device) and $1.pub (register it with the server)"
