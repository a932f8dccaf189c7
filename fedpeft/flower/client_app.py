"""The Flower ClientApp: a thin shell around :func:`fedpeft.client.run_client_round`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedpeft.config import Config, parse_config
from fedpeft.errors import ClientStateError, ConfigError, PrivacyBudgetExhausted
from fedpeft.flower.fault_injection import inject_faults
from fedpeft.flower.records import (
    DECLINED,
    GLOBAL_ADAPTER,
    ROUND_CONFIG,
    TRAIN_METRICS,
    UPDATE,
    record_to_state,
    state_to_record,
)
from fedpeft.flower.run_config import config_from_run_config
from fedpeft.flower.secure_client import is_secure_round, secure_aggregation_mod, secure_reply


def client_id_of(context: Context) -> int:
    """The client's id: ``partition-id`` from the node config.

    It names the client to the server (metrics, DP ledger, the codecs' shared
    randomness) and, unless the node brings its own ``data-file``, picks its partition
    of the configured training data.
    """
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ConfigError("node config lacks 'partition-id' (start the SuperNode with --node-config)")
    value = node_config["partition-id"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"node config 'partition-id': expected an integer >= 0, got {value!r}")
    return value


def config_for_node(config: Config, node_config: Mapping[str, object]) -> Config:
    """The run's config as this device runs it: its own ``device`` and ``data-file``.

    ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``) replaces ``train.device``.
    ``data-file`` (a TSV/CSV/JSONL path on the device, with the run's text and label
    columns) replaces the training data: the device trains on all of that file.
    """
    if "device" not in node_config and "data-file" not in node_config:
        return config
    data = config.to_dict()
    if "device" in node_config:
        data["train"]["device"] = str(node_config["device"])
    if "data-file" in node_config:
        path = Path(str(node_config["data-file"])).expanduser()
        if not path.is_file():
            raise ConfigError(f"node config 'data-file': {path} not found on this device")
        data["data"]["train"] = str(path.resolve())
        data["partition"].update(scheme="iid", num_clients=1)
        data["capture"]["clients"] = []  # the server's business; ids differ on this device
    return parse_config(data, "node config")


def build_client_app(
    config_for: Callable[[Context], Config],
    torch_threads: int | None = None,
    mods: list[Mod] | None = None,
    batch_records_for: Callable[[Context], Path | None] | None = None,
    state_dir: Path | None = None,
) -> ClientApp:
    """A ClientApp whose config comes from ``config_for(context)``.

    The simulation passes a closure over its resolved config; deployment reads the
    Flower run config.

    Args:
        config_for: Returns the run's config for a Flower context.
        torch_threads: Intra-op threads for torch in this process (the CPUs the
            simulation gives each virtual client); None leaves torch's default.
        mods: Flower client mods wrapped around every message.
        batch_records_for: Where a DP client writes its own record of the batches it
            drew in captured rounds, so that attacks on its update can be scored
            (:mod:`fedpeft.attacks.drawn_batches`); the simulation passes its capture
            folder. None (real SuperNodes): no record is written.
        state_dir: Where every client keeps its state between rounds, in place of the
            node config's ``state-dir`` (:mod:`fedpeft.flower.client_state`); the
            simulation passes one inside its run folder.

    """
    # SecAgg+ rounds pass through Flower's mod (inside any other mod, so that fault
    # injection can also drop a client mid-protocol); plain rounds are left alone.
    app = ClientApp(mods=[*(mods or []), secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # Imported here, not at the top: a deployed SuperNode starts a ClientApp process
        # per message, and SecAgg+'s key stages (three of its four per round) never
        # train; they then cost a Flower import, not torch's, peft's and the attacks'.
        import torch

        from fedpeft.attacks.drawn_batches import save_drawn_batches
        from fedpeft.client import run_client_round
        from fedpeft.experiment import Experiment
        from fedpeft.flower.client_state import load_client_state, save_client_state

        if torch_threads is not None and torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        started = time.monotonic()
        config = config_for_node(config_for(context), context.node_config)
        experiment = Experiment.cached(config)
        client_id = client_id_of(context)
        partition = 0 if "data-file" in context.node_config else client_id
        server_round = int(msg.content.config_records[ROUND_CONFIG]["server-round"])  # type: ignore[arg-type]
        run_key = str(msg.content.config_records[ROUND_CONFIG].get("run-key", ""))
        global_state = record_to_state(msg.content.array_records[GLOBAL_ADAPTER])
        # The client's DP events and codec memory persist in its own state, so epsilon
        # composes over every round it takes part in (across a resumed run too, with
        # the node config state-dir).
        try:
            state = load_client_state(context, run_key, state_dir)
        except ClientStateError as err:  # a bad run key, or a ledger no copy of which is readable
            return decline(msg, str(err))
        try:
            result = run_client_round(
                experiment,
                client_id,
                global_state,
                server_round,
                state.memory,
                state.ledger,
                partition=partition,
            )
        except PrivacyBudgetExhausted as err:
            # Not a failure: the client keeps its promise. Say so instead of raising,
            # which Flower would log as a crash with a traceback.
            return decline(msg, str(err))
        save_client_state(context, run_key, state, state_dir)
        records = batch_records_for(context) if batch_records_for is not None else None
        captured = server_round in config.capture.rounds and (
            not config.capture.clients or client_id in config.capture.clients
        )
        if records is not None and captured and result.drawn_batches:
            save_drawn_batches(records, server_round, client_id, result.drawn_batches)
        values: dict[str, int | float | list[int] | list[float]] = {
            "client-id": client_id,
            "num-examples": result.num_examples,
            "steps": result.steps,
            "train-seconds": time.monotonic() - started,
        }
        if result.privacy is None:
            values["train-loss"] = result.train_loss
        else:
            # Under DP-SGD only noised results leave the client: the training loss is an
            # un-noised function of every example, so it stays here. num-examples is
            # assumed public (as in Opacus and TF Privacy); steps follow from it and the
            # config; train-seconds tells no more than the reply's arrival time does.
            values.update(
                {
                    "dp-noise-multiplier": result.privacy.noise_multiplier,
                    "dp-sample-rate": result.privacy.sample_rate,
                    "dp-steps": result.privacy.steps,
                }
            )
            if result.epsilon is not None and math.isfinite(result.epsilon):
                values["epsilon"] = result.epsilon
        metrics = MetricRecord(values)
        if is_secure_round(msg):
            return secure_reply(msg, context, config, result.payload, result.num_examples, metrics)
        content = RecordDict({UPDATE: state_to_record(result.payload), TRAIN_METRICS: metrics})
        return Message(content=content, reply_to=msg)

    return app


def decline(msg: Message, reason: str) -> Message:
    """A reply that says why the client will not train this round.

    In a SecAgg+ round the protocol has no place for a decline: the client fails the
    round instead, which the protocol treats as a dropout (its masks are removed).
    """
    if is_secure_round(msg):
        raise ClientDeclined(reason)
    return Message(content=RecordDict({DECLINED: ConfigRecord({"reason": reason})}), reply_to=msg)


class ClientDeclined(RuntimeError):
    """The client will not train this secure round (its reason is the message)."""


app = build_client_app(config_from_run_config, mods=[inject_faults])
"""The deployed ClientApp, in ``flwr-clientapp`` or a warm worker (``fedpeft worker``);
:func:`inject_faults` acts only on nodes given a ``fault``."""
