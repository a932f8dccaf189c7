"""Submit a run to a SuperLink: ``fedpeft deploy`` over Flower's ``flwr run``.

Why a wrapper: ``flwr run`` reads its settings from ``pyproject.toml`` and sends the
app unchecked, so a typo in a config key surfaces minutes later in a server log. Here
the config is resolved and validated first, then sent whole as the run config's
``config-toml``, so the ServerApp and every ClientApp parse exactly that text.
"""

from __future__ import annotations

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


def with_deployment_defaults(config: Config, progress: Callable[[str], None] = print) -> Config:
    """``config`` as a deployed server runs it: with a norm bound if it sets none.

    Says so through ``progress`` (the server's log, which ``fedpeft deploy`` streams).
    The run folder's ``config.toml`` then holds the bound, and a resume applies the
    same default, so the config fingerprint matches.
    """
    if config.federation.max_update_norm is not None:
        return config
    progress(
        f"federation.max_update_norm unset: deployed, every client update is clipped to L2 norm "
        f"{DEPLOYMENT_MAX_UPDATE_NORM:g} (set federation.max_update_norm to choose another bound)"
    )
    data = config.to_dict()
    data["federation"]["max_update_norm"] = DEPLOYMENT_MAX_UPDATE_NORM
    return parse_config(data, "deployment defaults")


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


def deploy(config: Config, superlink: str, out_dir: Path, resume: bool = False) -> int:
    """Submit the run to ``superlink`` and stream its log here; returns flwr's exit code."""
    with tempfile.TemporaryDirectory(prefix="fedpeft-deploy-") as folder:
        command = deploy_command(config, superlink, out_dir, resume, Path(folder) / "run-config.toml")
        return subprocess.run(command, check=False).returncode
