"""The Flower ServerApp: the round loop, central evaluation and the run folder.

The loop is written out (instead of ``Strategy.start``) because it owns what Flower's
loop does not: per-round bytes, a progress line, ``metrics.json`` after every round
and the final peft checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

import fedpeft
from fedpeft.attacks.capture import CapturePlan, threat_model_of
from fedpeft.config import Config
from fedpeft.errors import FedPeftError
from fedpeft.experiment import Experiment
from fedpeft.flower.records import record_to_state, state_to_record
from fedpeft.flower.run_config import config_from_run_config, out_dir_from_run_config
from fedpeft.flower.strategy import AdapterStrategy
from fedpeft.history import ClientRoundRecord, RoundRecord, RunHistory, write_json_atomic
from fedpeft.models import base_model_nbytes, load_adapter_state, save_adapter, state_nbytes
from fedpeft.privacy.ledger import SERVER, DpEvent, PrivacyLedger
from fedpeft.training import EvalResult, evaluate

logger = logging.getLogger("fedpeft")


class FederationError(FedPeftError):
    """A round produced no usable update at all (every client failed or was rejected)."""


def evaluate_state(experiment: Experiment, state: Mapping[str, Tensor]) -> EvalResult:
    """Central evaluation of an adapter state on the test split."""
    model = experiment.model.model
    load_adapter_state(model, state)
    return evaluate(model, experiment.test_loader, experiment.config.model.task, experiment.device)


def format_bytes(n: float) -> str:
    """Human-readable byte count (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def run_federation(
    grid: Grid,
    config: Config,
    out_dir: Path,
    progress: Callable[[str], None] = print,
) -> RunHistory:
    """Run every round on ``grid`` and write the run folder.

    Writes ``out_dir/config.toml`` first, ``out_dir/metrics.json`` after every round and
    ``out_dir/adapter/`` (a peft checkpoint of the final global adapter) at the end.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(config.to_toml(), encoding="utf-8")
    experiment = Experiment.cached(config)
    strategy = AdapterStrategy(
        config.federation,
        experiment.codec,
        experiment.new_aggregator(),
        config.seed,
        config.privacy.client,
        capture_plan(config, experiment, out_dir / "captures"),
    )
    ledger = PrivacyLedger()
    global_state = dict(experiment.initial_state)

    experiment.prepare_round(1)
    initial = evaluate_state(experiment, global_state)
    history = RunHistory(
        meta={
            "fedpeft_version": fedpeft.__version__,
            "config_fingerprint": config.fingerprint(),
            "model": config.model.name_or_path,
            "adapter_method": config.adapter.method,
            "codec": config.federation.codec,
            "aggregator": config.federation.aggregator,
            "num_clients": config.partition.num_clients,
            "device": str(experiment.device),
            "base_model_bytes": base_model_nbytes(experiment.model.model),
            "adapter_bytes": state_nbytes(global_state),
            "trainable_parameters": sum(t.numel() for t in global_state.values()),
        },
        initial={"accuracy": initial.accuracy, "loss": initial.loss},
    )
    progress(
        f"round 0/{config.federation.rounds}  acc {initial.accuracy:.4f}  "
        f"loss {initial.loss:.4f}  (before training)"
    )
    rounds = config.federation.rounds
    for server_round in range(1, rounds + 1):
        started = time.monotonic()
        stage_metrics: dict[str, float] = {}
        if experiment.slora is not None and server_round == config.slora.rounds + 1:
            # SLoRA's switch: LoRA starts from the SVD of the aggregated sparse update;
            # the tensor names change, so the aggregator (and any state it keeps) restarts.
            global_state, stage_metrics = experiment.slora.lora_init(global_state)
            strategy.aggregator = experiment.new_aggregator()
            history.meta["adapter_bytes"] = state_nbytes(global_state)
            history.meta["trainable_parameters"] = sum(t.numel() for t in global_state.values())
            progress(
                "slora: stage 2 starts LoRA from the truncated SVD of the stage-1 update "
                f"(norm {stage_metrics['slora_update_norm']:.4g}, "
                f"truncation drops {stage_metrics['slora_svd_dropped_norm']:.4g})"
            )
        experiment.prepare_round(server_round)
        messages = strategy.configure_train(server_round, state_to_record(global_state), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=config.federation.round_timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        traffic = strategy.traffic
        if not traffic.clients:
            reasons = "; ".join(str(r["reason"]) for r in traffic.rejected[:3]) or "no replies"
            raise FederationError(f"round {server_round}: no client produced a usable update ({reasons})")
        if new_arrays is not None:
            global_state = record_to_state(new_arrays)
        result = evaluate_state(experiment, global_state)
        examples = sum(c.num_examples for c in traffic.clients)
        record = RoundRecord(
            round=server_round,
            accuracy=result.accuracy,
            loss=result.loss,
            bytes_up=sum(c.bytes_up for c in traffic.clients),
            bytes_down=sum(traffic.bytes_down_by_node.values()),
            clients=len(traffic.clients),
            seconds=time.monotonic() - started,
            train_loss=sum(c.train_loss * c.num_examples for c in traffic.clients) / examples,
            rejected=traffic.rejected,
            per_client=sorted(traffic.clients, key=lambda c: c.client_id),
            aggregation={**stage_metrics, **(traffic.aggregation.metrics if traffic.aggregation else {})},
        )
        record_privacy_events(
            ledger, config, server_round, traffic.clients, strategy.sampled, num_nodes(grid)
        )
        record.privacy.update(privacy_summary(ledger, config))
        history.rounds.append(record)
        if ledger.events:
            write_json_atomic(out_dir / "privacy_ledger.json", ledger.to_data())
        history.write(out_dir / "metrics.json")
        spent = "".join(
            f"  eps({unit}) {record.privacy[f'epsilon_{unit}']:.3g}"
            for unit in ("example", "client")
            if f"epsilon_{unit}" in record.privacy
        )
        progress(
            f"round {server_round}/{rounds}  acc {record.accuracy:.4f}  loss {record.loss:.4f}  "
            f"up {format_bytes(record.bytes_up)}  down {format_bytes(record.bytes_down)}  "
            f"clients {record.clients}  {record.seconds:.1f} s{spent}"
        )
    save_adapter(experiment.model.model, global_state, out_dir / "adapter")
    history.write(out_dir / "metrics.json")
    return history


def capture_plan(config: Config, experiment: Experiment, folder: Path) -> CapturePlan | None:
    """The strategy's capture settings from ``[capture]`` (None when nothing is captured)."""
    capture = config.capture
    if not capture.rounds:
        return None
    return CapturePlan(
        folder=folder,
        rounds=frozenset(capture.rounds),
        clients=frozenset(capture.clients),
        malicious=capture.malicious,
        threat_model=threat_model_of(config.train, capture.malicious),
        learning_rates={r: experiment.train_config_for(r).lr for r in capture.rounds},
        local_steps=config.train.steps,
    )


def num_nodes(grid: Grid) -> int:
    """How many clients are connected (the population the server samples from)."""
    return len(list(grid.get_node_ids()))


def record_privacy_events(
    ledger: PrivacyLedger,
    config: Config,
    server_round: int,
    clients: Iterable[ClientRoundRecord],
    sampled: int,
    population: int,
) -> None:
    """Add the round's DP events: each client's DP-SGD (as it reported) and the server's noise."""
    for client in clients:
        if client.dp_noise_multiplier is not None:
            ledger.record(
                DpEvent(
                    server_round,
                    str(client.client_id),
                    "example",
                    client.dp_noise_multiplier,
                    float(client.dp_sample_rate or 1.0),
                    int(client.dp_steps or 0),
                )
            )
    central = config.privacy.client
    if central.enabled:
        rate = min(1.0, sampled / max(population, 1))
        ledger.record(DpEvent(server_round, SERVER, "client", central.noise_multiplier, rate, 1))


def privacy_summary(ledger: PrivacyLedger, config: Config) -> dict[str, float]:
    """Epsilon so far per unit, computed from the ledger (the only source of epsilons)."""
    summary: dict[str, float] = {}
    example = config.privacy.example
    if example.enabled:
        epsilons = [
            ledger.epsilon(example.delta, party, "example", example.accountant)
            for party in ledger.parties("example")
        ]
        summary["epsilon_example"] = max(epsilons, default=0.0)
        summary["delta_example"] = example.delta
    central = config.privacy.client
    if central.enabled:
        summary["epsilon_client"] = ledger.epsilon(central.delta, SERVER, "client", central.accountant)
        summary["delta_client"] = central.delta
    return summary


def build_server_app(
    config_for: Callable[[Context], Config],
    out_dir_for: Callable[[Context], Path],
    on_finish: Callable[[RunHistory], None] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`run_federation` with the config from ``config_for``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        history = run_federation(grid, config_for(context), out_dir_for(context))
        if on_finish is not None:
            on_finish(history)

    return app


app = build_server_app(config_from_run_config, out_dir_from_run_config)
