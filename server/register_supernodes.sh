#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink: only registered nodes may join.
#
#   server/register_supernodes.sh CONNECTION KEY.pub [KEY.pub ...]
#
# CONNECTION is a name made with server/connect.sh for the Control address (loopback
# or an ssh tunnel; the public Fleet port refuses registration). Each device makes its
# key pair with clients/make_node_key.sh and sends only the .pub file to the operator.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONNECTION KEY.pub [KEY.pub ...]" >&2
    exit 2
fi
connection=$1
shift
for key in "$@"; do
    [ -f "$key" ] || { echo "$0: $key not found" >&2; exit 2; }
    flwr supernode register "$key" "$connection" --name "$(basename "$key" .pub)"
done
