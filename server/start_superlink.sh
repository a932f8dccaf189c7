#!/usr/bin/env bash
# Start a Flower SuperLink with TLS and SuperNode authentication, reachable from other
# machines only through a gateway that serves the Fleet API (SuperNodes) and nothing else.
#
#   server/start_superlink.sh --certs DIR [--state DIR] [--host HOST] [--port PORT]
#       [--control-host HOST] [--control-port PORT]
#
# --certs         folder with ca.crt, server.crt and server.key (server/make_certificates.sh);
#                 it must not hold the CA's private key ca.key
# --state         folder for the SuperLink's database: registered SuperNodes and runs
#                 survive a restart (default: ./superlink-state)
# --host, --port  the public (Fleet) address SuperNodes dial (default 127.0.0.1:9092;
#                 --host 0.0.0.0 to accept other machines). Only Flower's Fleet API
#                 routes pass (fedpeft/flower/fleet_gateway.py); everything else gets 403.
# --control-host, --control-port
#                 where the SuperLink itself listens: its Control API (flwr: register
#                 keys, start runs) and the ServerApp's Runtime API (default
#                 127.0.0.1:9093). Keep it on loopback; a remote operator reaches it
#                 through ssh -L 9093:127.0.0.1:9093 SERVER.
# Why the split: Flower 1.41 serves Fleet, Control and Runtime on one port and, without
# its OIDC account plugin, lets anyone who completes the TLS handshake use Control, and
# ca.crt, which every device holds, is all the handshake needs.
# Any other arguments go to flower-superlink unchanged. Stopping this script (Ctrl-C,
# SIGTERM) stops both processes; if either exits, the other is stopped too.
set -euo pipefail
certs="" state="superlink-state" host=127.0.0.1 port=9092 control_host=127.0.0.1 control_port=9093 extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --certs) certs=$2; shift 2 ;;
        --state) state=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --control-host) control_host=$2; shift 2 ;;
        --control-port) control_port=$2; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done
if [ -z "$certs" ]; then
    echo "usage: $0 --certs DIR [--state DIR] [--host HOST] [--port PORT]" \
        "[--control-host HOST] [--control-port PORT]" >&2
    exit 2
fi
for f in ca.crt server.crt server.key; do
    [ -f "$certs/$f" ] || { echo "$0: $certs/$f not found (make it with server/make_certificates.sh)" >&2; exit 2; }
done
if [ -e "$certs/ca.key" ]; then
    echo "$0: $certs/ca.key is the CA's private key: whoever holds it can impersonate this" \
        "server; the SuperLink must not read it. Move it out (mkdir -m 700 ca-private &&" \
        "mv $certs/ca.key ca-private/) and keep it offline if you can." >&2
    exit 2
fi
if [ "$host:$port" = "$control_host:$control_port" ] || [ "$port" = "$control_port" ]; then
    echo "$0: --port $port and --control-port $control_port must differ" >&2
    exit 2
fi
mkdir -p "$state"
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
# Flower's legacy gRPC Control and Fleet servers would listen on 0.0.0.0: keep them off.
unset FLWR_INTERNAL_GRPC_CONTROL_API FLWR_INTERNAL_GRPC_FLEET_API
python=${PYTHON:-python}
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The app's dependencies are installed already (scripts/install.sh): Flower must not
# build a second environment for it at run time.
flower-superlink \
    --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --database "$state/superlink.db" \
    --disable-runtime-dependency-installation \
    --host "$control_host" --port "$control_port" \
    "${extra[@]}" &
pids+=($!)
case $control_host in  # the address the gateway dials: loopback for a wildcard
    0.0.0.0) dial=127.0.0.1 ;;
    :: | "[::]") dial="[::1]" ;;
    *:*) dial="[${control_host#[}" && dial="${dial%]}]" ;;
    *) dial=$control_host ;;
esac
"$python" -m fedpeft.flower.fleet_gateway \
    --host "$host" --port "$port" --superlink "$dial:$control_port" --certs "$certs" &
pids+=($!)
set +e
wait -n
code=$?
exit "$code"
