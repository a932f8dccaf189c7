#!/usr/bin/env bash
# Start a Flower SuperNode for one device: TLS to the SuperLink, authenticated by key.
#
#   clients/start_supernode.sh --superlink HOST:PORT --ca CA_CERT --key PRIVATE_KEY \
#       --partition-id N [--data-file PATH] [--device cpu|cuda|cuda:N|auto] [--port PORT]
#
# --superlink     the SuperLink's public (Fleet) address, e.g. fl.example.org:9092
#                 (server/start_superlink.sh --host/--port)
# --ca            the CA certificate (ca.crt; public, not a secret)
# --partition-id  the client's id; without --data-file also its partition of the
#                 run's training data (for trials with one shared data set)
# --data-file     this device's own training data (TSV/CSV/JSONL with the run's text
#                 and label columns); the device trains on all of it
# --device        where this device trains (default: the run's train.device)
# --state-dir     where the device keeps what it remembers between rounds (its DP
#                 ledger, top-k residuals), so a resumed run continues them
#                 (default: PRIVATE_KEY.state, beside the key)
# --port          local port of the SuperNode's own API (default 9094; give each
#                 SuperNode on one machine its own)
# --warm-worker   run every ClientApp task in one long-lived process (fedpeft worker)
#                 that keeps the model loaded between rounds, instead of Flower's
#                 fresh flwr-clientapp process per message (docs/deployment.md)
# --busy-poll S   after a message or reply, look for the next one S seconds later, then
#                 1.25x longer per empty poll up to Flower's fixed 3 s (default 0.1;
#                 0 keeps Flower's 3 s; fedpeft/flower/supernode.py)
# --threads N     CPU threads for training on this device (OMP_NUM_THREADS for the
#                 worker and the ClientApp processes; default: torch's, every core).
#                 Give several SuperNodes on one machine a share each: oversubscribed
#                 cores slow every node down several times over
# --fault KINDS   fire drill: send broken updates, one kind per round in turn
#                 (none, nan, inf, oversize, wrong-shape, crash, and under secure
#                 aggregation secagg-drop-after-keys; e.g. "nan,oversize"; see
#                 fedpeft/flower/fault_injection.py). Never in production.
# Any other arguments go to flower-supernode unchanged. The node runs as
# fedpeft-supernode: flower-supernode sending each reply as soon as it is ready
# (after a SuperLink restart Flower's own can hold a node's replies back one message
# each, for good) and polling sooner while a run is busy (fedpeft/flower/supernode.py).
set -euo pipefail
superlink="" ca="" key="" node_config="" state_dir="" port=9094 warm_worker="" threads="" busy_poll=0.1 extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --superlink) superlink=$2; shift 2 ;;
        --ca) ca=$2; shift 2 ;;
        --key) key=$2; shift 2 ;;
        --partition-id) node_config+="partition-id=$2 "; shift 2 ;;
        --data-file) node_config+="data-file=\"$(cd "$(dirname "$2")" && pwd)/$(basename "$2")\" "; shift 2 ;;
        --device) node_config+="device=\"$2\" "; shift 2 ;;
        --fault) node_config+="fault=\"$2\" "; shift 2 ;;
        --state-dir) state_dir=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --warm-worker) warm_worker=1; shift ;;
        --threads) threads=$2; shift 2 ;;
        --busy-poll) busy_poll=$2; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done
if [ -z "$superlink" ] || [ -z "$ca" ] || [ -z "$key" ] || [[ $node_config != *partition-id=* ]]; then
    echo "usage: $0 --superlink HOST:PORT --ca CA_CERT --key PRIVATE_KEY --partition-id N" \
        "[--data-file PATH] [--device DEVICE] [--port PORT] [--warm-worker] [--threads N]" >&2
    exit 2
fi
if [ -n "$threads" ]; then
    [[ $threads =~ ^[1-9][0-9]*$ ]] || { echo "$0: --threads: expected a positive integer, got '$threads'" >&2; exit 2; }
    export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
fi
[ -f "$ca" ] || { echo "$0: $ca not found" >&2; exit 2; }
[ -f "$key" ] || { echo "$0: $key not found (make it with clients/make_node_key.sh)" >&2; exit 2; }
state_dir=${state_dir:-$key.state}
mkdir -p "$state_dir" && chmod 700 "$state_dir"
node_config+="state-dir=\"$(cd "$state_dir" && pwd)\" "
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# The SuperExec looks for a message to start a ClientApp for once a second by default.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}
if [ -n "$warm_worker" ]; then
    # The SuperNode starts no SuperExec (--isolation process); the worker claims its
    # tasks on the local runtime API and exits once this process (which becomes the
    # SuperNode below) is gone.
    fedpeft worker --runtime-api "127.0.0.1:$port" --parent-pid $$ &
    extra+=(--isolation process)
fi
exec fedpeft-supernode --busy-poll "$busy_poll" \
    --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" \
    --node-config "${node_config% }" --port "$port" \
    "${extra[@]}"
