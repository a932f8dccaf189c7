"""Read a fedpeft config from a Flower run config (the deployment path, ``flwr run``).

``pyproject.toml``'s ``[tool.flwr.app.config]`` (or ``flwr run --run-config``) sets:

- ``config-file``: a TOML file under the app folder (``configs/default.toml``);
- ``config-overrides``: optional ``KEY=VALUE`` assignments separated by ``;``;
- ``config-toml``: a whole resolved config as TOML text, which replaces the two keys
  above (``fedpeft deploy`` sends this, so the server and every SuperNode run exactly
  the config that was validated where the run was submitted);
- ``out-dir``: where the server writes the run folder (give an absolute path: the
  ServerApp runs in Flower's app folder, not where ``flwr run`` was typed);
- ``resume``: continue the unfinished run checkpointed in ``out-dir``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from fedpeft.config import Config, config_from_toml, load_config
from fedpeft.errors import ConfigError


def config_from_run_config(context: Context) -> Config:
    """The Config named by the run config, with its overrides applied."""
    run_config = context.run_config
    inline = str(run_config.get("config-toml", ""))
    if inline.strip():
        return config_from_toml(inline)
    name = str(run_config.get("config-file", "configs/default.toml"))
    path = Path(name)  # relative paths: the app's folder, where Flower runs the apps
    if not path.is_file():
        raise ConfigError(f"run config 'config-file': {path} not found")
    overrides = [s for s in str(run_config.get("config-overrides", "")).split(";") if s.strip()]
    return load_config(path, overrides)


def out_dir_from_run_config(context: Context) -> Path:
    """The run folder the server writes (``runs/flwr`` when unset)."""
    return Path(str(context.run_config.get("out-dir", "runs/flwr")))


def resume_from_run_config(context: Context) -> bool:
    """Whether to continue the run checkpointed in the run folder (``resume``)."""
    value = context.run_config.get("resume", False)
    if not isinstance(value, bool):
        raise ConfigError(f"run config 'resume': expected true or false, got {value!r}")
    return value
