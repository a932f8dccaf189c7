#!/usr/bin/env bash
# Tell the flwr command line where a SuperLink is: adds (or replaces) a connection in
# the Flower configuration file ($FLWR_HOME/config.toml, default ~/.flwr/config.toml).
#
#   server/connect.sh NAME HOST:PORT CA_CERT
#
# HOST:PORT is the SuperLink's Control address (server/start_superlink.sh
# --control-host/--control-port, default 127.0.0.1:9093): on the server itself, or
# through an ssh tunnel (ssh -N -L 9093:127.0.0.1:9093 SERVER). The public Fleet port
# refuses Control calls. Then `flwr run . NAME`, `fedpeft deploy --superlink NAME` and
# `flwr supernode register KEY.pub NAME` talk to that SuperLink over TLS.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 NAME HOST:PORT CA_CERT" >&2
    exit 2
fi
ca=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
[ -f "$ca" ] || { echo "$0: $3 not found" >&2; exit 2; }
python=${PYTHON:-python}
"$python" - "$1" "$2" "$ca" <<'PY'
import os, sys
from pathlib import Path
import tomli_w
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
name, address, ca = sys.argv[1:]
path = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "config.toml"
data = tomllib.loads(path.read_text()) if path.is_file() else {}
links = data.setdefault("superlink", {})
links.setdefault("default", name)
links[name] = {"address": address, "root-certificates": ca}
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(tomli_w.dumps(data))
print(f"{path}: SuperLink connection {name!r} -> {address} (TLS, CA {ca})")
PY
