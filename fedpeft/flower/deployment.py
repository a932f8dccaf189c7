"""Submit a run to a SuperLink: ``fedpeft deploy`` over Flower's ``flwr run``.

Why a wrapper: ``flwr run`` reads its settings from ``pyproject.toml`` and sends the
app unchecked, so a typo in a config key surfaces minutes later in a server log. Here
the config is resolved and validated first, then sent whole as the run config's
``config-toml``, so the ServerApp and every ClientApp parse exactly that text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import tomli_w

from fedpeft.config import Config, parse_config
from fedpeft.errors import ConfigError

DEPLOYMENT_MAX_UPDATE_NORM = 10.0
"""``federation.max_update_norm`` of a deployed run that leaves it unset.

In simulation every client is the operator's own code; deployed, a device can send any
well-formed update, and with FedAvg one huge update would be the global model. So a
deployed server bounds each update's L2 norm unless told otherwise, as Flower's
DP wrappers insist on a clipping norm. 10 is the bound of the robust example configs;
the default config's clients (MiniLM, LoRA r = 8, 30 steps at lr 3e-3) move 6.3 to 7.2
in round 1, and larger adapters move further: ``clipped_updates`` and
``update_norm_median`` in metrics.json show whether honest updates are cut, and the
key sets another bound.
"""


def with_deployment_defaults(
    config: Config, progress: Callable[[str], None] = print, sent_to_clients: bool = False
) -> Config:
    """``config`` as a deployed server runs it: with a norm bound if it sets none.

    Says so through ``progress`` (the server's log, which ``fedpeft deploy`` streams).
    The run folder's ``config.toml`` then holds the bound, and a resume applies the
    same default, so the config fingerprint matches.

    Args:
        config: The run's config.
        progress: Where the note goes.
        sent_to_clients: The bound will travel in the run config (``fedpeft deploy``
            applies it before submitting), so the ClientApps read it too. False: only
            this server holds it (a run submitted with plain ``flwr run``).

    """
    if config.federation.max_update_norm is not None:
        return config
    progress(deployment_norm_note(config, sent_to_clients))
    data = config.to_dict()
    data["federation"]["max_update_norm"] = DEPLOYMENT_MAX_UPDATE_NORM
    return parse_config(data, "deployment defaults")


def deployment_norm_note(config: Config, sent_to_clients: bool) -> str:
    """What the default bound does in this run: who clips what to it.

    Under secure aggregation the server never sees a single update, so it cannot clip
    one: each client clips its own update before masking it
    (:func:`fedpeft.flower.secure_client.secure_reply`), which holds only for honest
    clients that were sent the bound, and the server can clip only the round's mean.
    """
    bound = f"{DEPLOYMENT_MAX_UPDATE_NORM:g}"
    choose = "set federation.max_update_norm to choose another bound"
    if not config.federation.secure_aggregation.enabled:
        return (
            f"federation.max_update_norm unset: deployed, every client update is clipped to L2 norm "
            f"{bound} ({choose})"
        )
    if sent_to_clients:
        clients = f"each client clips its own update to L2 norm {bound} before masking it"
    else:
        clients = (
            "the clients were not sent this bound and clip nothing (submit with fedpeft deploy, "
            "which sends it, or set federation.max_update_norm)"
        )
    return (
        f"federation.max_update_norm unset: deployed under secure aggregation, the server sees only "
        f"the round's sum and cannot clip single updates: {clients}, and the server clips the "
        f"round's mean to {bound}; an honest client's bound, not a check ({choose})"
    )


def app_folder() -> Path:
    """The Flower app that ``flwr run`` builds: the folder of fedpeft's ``pyproject.toml``."""
    folder = Path(__file__).resolve().parents[2]
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise ConfigError(
            f"fedpeft deploy needs fedpeft's source folder (with its pyproject.toml) to build the "
            f"Flower app from; {folder} is not one. Install fedpeft from a clone with pip install -e ."
        )
    return folder


def deploy_command(
    config: Config, superlink: str, out_dir: Path, resume: bool, run_config_file: Path
) -> list[str]:
    """The ``flwr run`` command line, after writing the run config it points at.

    Args:
        config: The validated run config, sent whole.
        superlink: A SuperLink connection name from the Flower configuration file.
        out_dir: Run folder on the server machine (made absolute here).
        resume: Continue the unfinished run checkpointed in ``out_dir``.
        run_config_file: Where to write the run-config TOML for ``flwr run``.

    """
    beside_python = Path(sys.executable).parent / "flwr"  # the environment fedpeft runs in
    flwr = str(beside_python) if beside_python.is_file() else shutil.which("flwr")
    if flwr is None:
        raise ConfigError("the flwr command is not on PATH (activate fedpeft's environment)")
    run_config = {"config-toml": config.to_toml(), "out-dir": str(out_dir.resolve()), "resume": resume}
    run_config_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
    return [flwr, "run", str(app_folder()), superlink, "--stream", "--run-config", str(run_config_file)]


RUN_STARTED = re.compile(r"Successfully started run (\d+)")
"""The line of ``flwr run`` that names the run it started."""
STATUS_TIMEOUT = 30.0
"""Seconds ``fedpeft deploy`` waits for the SuperLink to say how a run ended."""


def deploy(config: Config, superlink: str, out_dir: Path, resume: bool = False) -> int:
    """Submit the run to ``superlink`` and stream its log here; 0 only if the run completed.

    The deployment defaults are applied here, before the config is sent: the ClientApps
    read the run config, not the server's copy, and under secure aggregation a client
    clips its own update to ``federation.max_update_norm``.

    ``flwr run --stream`` exits 0 when the log stream ends, whether the ServerApp
    finished or raised (a :class:`~fedpeft.flower.server_app.FederationError`, say).
    So the run's id is read from its output and its final status asked of the
    SuperLink: a run that did not complete returns 1, with the status and the reason
    (the ServerApp's exception) as the last line.
    """
    config = with_deployment_defaults(config, sent_to_clients=True)
    with tempfile.TemporaryDirectory(prefix="fedpeft-deploy-") as folder:
        command = deploy_command(config, superlink, out_dir, resume, Path(folder) / "run-config.toml")
        run_id = None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log as it comes, through the pipe
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, errors="replace", env=env) as flwr:
            for line in flwr.stdout or ():
                sys.stdout.write(line)
                sys.stdout.flush()
                if run_id is None and (started := RUN_STARTED.search(line)):
                    run_id = int(started.group(1))
    if flwr.returncode != 0 or run_id is None:
        return flwr.returncode or 1
    status, details = run_status(command[0], superlink, run_id)
    if status != "finished:completed":
        print(f"fedpeft deploy: run {run_id} ended {status}: {details}", file=sys.stderr)
        return 1
    return 0


def run_status(flwr: str, superlink: str, run_id: int) -> tuple[str, str]:
    """Run ``run_id``'s status at the SuperLink, and its details, from ``flwr ls``.

    The status is Flower's: ``finished:completed``, ``finished:failed`` (the details
    hold the ServerApp's exception), ``finished:stopped``, ``running``, ...
    """
    command = [flwr, "ls", superlink, "--run-id", str(run_id), "--format", "json"]
    try:  # bounded: a SuperLink that went down with the run must not hang the operator
        done = subprocess.run(
            command, capture_output=True, text=True, errors="replace", check=False, timeout=STATUS_TIMEOUT
        )
        answer = json.loads(done.stdout)
        if not answer.get("success"):
            return "unknown", f"flwr ls: {' '.join(str(answer.get('error-message')).split())}"
        run = answer["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except subprocess.TimeoutExpired:
        return "unknown", f"flwr ls did not answer in {STATUS_TIMEOUT:g} s"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        reason = done.stdout.strip() or done.stderr.strip()
        return "unknown", f"flwr ls could not tell ({reason[-500:]})"
