"""Run a config on Flower's simulation engine (virtual clients on this machine).

Uses Flower's Python entry point ``run_simulation`` rather than ``flwr run``: it runs
in-process with the already validated config object, so bad input fails before Ray
starts and the server's own errors surface as one clear line. ``flwr run .`` works
too (see README) through the module-level apps.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from fedpeft.checkpoint import check_run_folder
from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.history import RunHistory


def run_simulation(config: Config, out_dir: Path, verbose: bool = False, resume: bool = False) -> RunHistory:
    """Simulate ``config.partition.num_clients`` clients and write the run folder.

    With ``resume`` the run continues after the last round checkpointed in ``out_dir``.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        # Inherited by the simulation's worker processes.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedpeft.flower.client_app import build_client_app
    from fedpeft.flower.server_app import build_server_app

    # Fail on data, partition, model and run-folder problems here, before any worker starts.
    check_cohort_fits(config)
    if resume or out_dir.exists():
        check_run_folder(out_dir, config, resume)
    experiment = Experiment.cached(config)
    print(f"partitions ({config.partition.scheme}, {config.partition.num_clients} clients):")
    print(experiment.partitions.summary(experiment.data.label_names))
    _ = experiment.model
    if config.privacy.example.enabled:
        plan = experiment.privacy_plan
        print(
            f"DP-SGD noise multiplier per client: {min(plan.values()):.3f} .. {max(plan.values()):.3f} "
            f"(clipping {config.privacy.example.max_grad_norm}, delta {config.privacy.example.delta})"
        )

    outcome: dict[str, object] = {}

    def remember(history: RunHistory) -> None:
        outcome["history"] = history

    server_app = build_server_app(
        lambda _: config, lambda _: out_dir, on_finish=remember, resume_for=lambda _: resume
    )
    client_app = build_client_app(
        lambda _: config,
        torch_threads=max(1, int(config.simulation.num_cpus_per_client)),
        batch_records_for=lambda _: out_dir / "captures",
        # On disk, not in Flower's contexts: those of every virtual client live in this process.
        state_dir=out_dir / "client-state",
    )
    backend_config = {
        "client_resources": {
            "num_cpus": config.simulation.num_cpus_per_client,
            "num_gpus": config.simulation.num_gpus_per_client,
        },
        "init_args": {"logging_level": "ERROR" if not verbose else "INFO", "log_to_driver": verbose},
    }
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flwr_run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.partition.num_clients,
                backend_config=backend_config,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.setLevel(previous)
    history = outcome.get("history")
    if not isinstance(history, RunHistory):
        raise RuntimeError("the simulation ended without finishing its rounds (see the log above)")
    return history


def check_cohort_fits(config: Config) -> None:
    """Refuse a cohort larger than the simulated federation, which would wait for ever.

    The simulation starts ``partition.num_clients`` virtual clients and no more can
    connect; a server waiting for more (``min_available_clients``) or for more usable
    updates a round (``min_train_clients``) would sit idle until
    ``federation.round_timeout`` (an hour by default) and then fail. A deployment is
    not checked: its SuperNodes join while the server waits.

    Raises:
        ConfigError: Names the key and the number of simulated clients.

    """
    clients = config.partition.num_clients
    for key in ("min_available_clients", "min_train_clients"):
        wanted = getattr(config.federation, key)
        if wanted > clients:
            raise ConfigError(
                f"federation.{key} = {wanted} but the simulation has partition.num_clients = {clients} "
                f"client(s): it would wait for clients that never connect; set federation.{key} <= {clients}"
            )
