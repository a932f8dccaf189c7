#!/usr/bin/env bash
# Start a Flower SuperLink with TLS and SuperNode authentication.
#
#   server/start_superlink.sh --certs DIR [--state DIR] [--host HOST] [--port PORT]
#
# --certs  folder with ca.crt, server.crt and server.key (server/make_certificates.sh)
# --state  folder for the SuperLink's database: registered SuperNodes and runs survive
#          a restart (default: ./superlink-state)
# --host   address to listen on (default 127.0.0.1; 0.0.0.0 to accept other machines)
# --port   port of the SuperLink's APIs, Fleet (SuperNodes), Control (flwr) and
#          Runtime (default 9093)
# Any other arguments go to flower-superlink unchanged. Only SuperNodes whose public
# key was registered (server/register_supernodes.sh) may join.
set -euo pipefail
certs="" state="superlink-state" host=127.0.0.1 port=9093 extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --certs) certs=$2; shift 2 ;;
        --state) state=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done
if [ -z "$certs" ]; then
    echo "usage: $0 --certs DIR [--state DIR] [--host HOST] [--port PORT]" >&2
    exit 2
fi
for f in ca.crt server.crt server.key; do
    [ -f "$certs/$f" ] || { echo "$0: $certs/$f not found (make it with server/make_certificates.sh)" >&2; exit 2; }
done
mkdir -p "$state"
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
# The app's dependencies are installed already (scripts/install.sh): Flower must not
# build a second environment for it at run time.
exec flower-superlink \
    --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --database "$state/superlink.db" \
    --disable-runtime-dependency-installation \
    --host "$host" --port "$port" \
    "${extra[@]}"
