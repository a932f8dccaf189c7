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
from pathlib import Path

import tomli_w

from fedpeft.config import Config
from fedpeft.errors import ConfigError


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
