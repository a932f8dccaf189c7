"""The Flower ClientApp: a thin shell around :func:`fedpeft.client.run_client_round`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.client import run_client_round
from fedpeft.config import Config
from fedpeft.errors import ConfigError, PrivacyBudgetExhausted
from fedpeft.experiment import Experiment
from fedpeft.flower.records import (
    CODEC_MEMORY,
    DECLINED,
    GLOBAL_ADAPTER,
    PRIVACY_LEDGER,
    ROUND_CONFIG,
    TRAIN_METRICS,
    UPDATE,
    record_to_state,
    state_to_record,
)
from fedpeft.flower.run_config import config_from_run_config
from fedpeft.privacy.ledger import PrivacyLedger


def client_id_of(context: Context) -> int:
    """The node's data partition: ``partition-id`` from the node config."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ConfigError("node config lacks 'partition-id' (start the SuperNode with --node-config)")
    return int(node_config["partition-id"])


def build_client_app(config_for: Callable[[Context], Config], torch_threads: int | None = None) -> ClientApp:
    """A ClientApp whose config comes from ``config_for(context)``.

    The simulation passes a closure over its resolved config; deployment reads the
    Flower run config.

    Args:
        config_for: Returns the run's config for a Flower context.
        torch_threads: Intra-op threads for torch in this process (the CPUs the
            simulation gives each virtual client); None leaves torch's default.

    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if torch_threads is not None and torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        started = time.monotonic()
        config = config_for(context)
        experiment = Experiment.cached(config)
        client_id = client_id_of(context)
        server_round = int(msg.content.config_records[ROUND_CONFIG]["server-round"])  # type: ignore[arg-type]
        global_state = record_to_state(msg.content.array_records[GLOBAL_ADAPTER])
        stored = context.state.array_records.get(CODEC_MEMORY)
        memory = record_to_state(stored) if stored is not None else {}
        # The client's DP events persist in its own state, so epsilon composes over
        # every round it takes part in, across server restarts of the same SuperNode.
        ledger_record = context.state.config_records.get(PRIVACY_LEDGER)
        ledger = PrivacyLedger.from_json(str(ledger_record["events"])) if ledger_record else PrivacyLedger()
        try:
            result = run_client_round(experiment, client_id, global_state, server_round, memory, ledger)
        except PrivacyBudgetExhausted as err:
            # Not a failure: the client keeps its promise. Say so instead of raising,
            # which Flower would log as a crash with a traceback.
            return Message(content=RecordDict({DECLINED: ConfigRecord({"reason": str(err)})}), reply_to=msg)
        if memory:
            context.state[CODEC_MEMORY] = state_to_record(memory)
        values: dict[str, int | float | list[int] | list[float]] = {
            "client-id": client_id,
            "num-examples": result.num_examples,
            "train-loss": result.train_loss,
            "steps": result.steps,
            "train-seconds": time.monotonic() - started,
        }
        if result.privacy is not None:
            context.state[PRIVACY_LEDGER] = ConfigRecord({"events": ledger.to_json()})
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
        content = RecordDict({UPDATE: state_to_record(result.payload), TRAIN_METRICS: metrics})
        return Message(content=content, reply_to=msg)

    return app


app = build_client_app(config_from_run_config)
