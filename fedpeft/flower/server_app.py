"""The Flower ServerApp: the round loop, central evaluation and the run folder.

The loop is written out (instead of ``Strategy.start``) because it owns what Flower's
loop does not: per-round bytes, a progress line, ``metrics.json`` after every round
and the final peft checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid
from torch import Tensor

import fedpeft
from fedpeft.attacks.capture import CapturePlan, malicious_adapter, threat_model_of
from fedpeft.checkpoint import RoundCheckpoint, check_run_folder, save_checkpoint
from fedpeft.codecs import CodecContext
from fedpeft.config import Config
from fedpeft.data.instructions import MESSAGES
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.experiment import Experiment
from fedpeft.flower.deployment import with_deployment_defaults
from fedpeft.flower.prompt_grid import PromptGrid
from fedpeft.flower.records import record_to_state, state_to_record
from fedpeft.flower.run_config import (
    config_from_run_config,
    out_dir_from_run_config,
    resume_from_run_config,
)
from fedpeft.flower.secure_aggregation import ProtocolSettings, payload_layout, secure_train_round
from fedpeft.flower.strategy import AdapterStrategy, RoundTraffic, mean_train_loss
from fedpeft.generation import score_generations
from fedpeft.history import ClientRoundRecord, RoundRecord, RunHistory, write_json_atomic, write_text_atomic
from fedpeft.model_card import render_model_card
from fedpeft.models import AdapterState, base_model_nbytes, load_adapter_state, save_adapter, state_nbytes
from fedpeft.privacy.central import AdaptiveClipping
from fedpeft.privacy.distributed import delta_with_clamps
from fedpeft.privacy.ledger import SERVER, DpEvent, PrivacyLedger, epsilon_of
from fedpeft.privacy.snr import noise_warnings
from fedpeft.training import EvalResult, evaluate

logger = logging.getLogger("fedpeft")


class FederationError(FedPeftError):
    """A round produced no usable update at all (every client failed or was rejected)."""


def evaluate_state(experiment: Experiment, state: Mapping[str, Tensor]) -> EvalResult:
    """Central evaluation of an adapter state on the test split."""
    model = experiment.model.model
    load_adapter_state(model, state)
    return evaluate(model, experiment.test_loader, experiment.config.model.task, experiment.device)


def score_answers(experiment: Experiment, server_round: int, out_dir: Path | None) -> dict[str, float]:
    """Instruction tuning: score greedy answers of the adapter just evaluated.

    A few answers per round go to ``generations.json`` (round -> samples), so that a
    user can read what the model says before training and after each round.
    """
    instruction = experiment.config.data.instruction
    if not instruction.enabled or instruction.generation_examples == 0:
        return {}
    chats = experiment.data.test[MESSAGES][: instruction.generation_examples]
    loaded = experiment.model
    result = score_generations(loaded.model, loaded.tokenizer, chats, instruction, experiment.device)
    if result is None:
        return {}
    if out_dir is None:
        return result.metrics()
    path = out_dir / "generations.json"
    shown = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    shown[str(server_round)] = result.samples
    write_json_atomic(path, shown)
    return result.metrics()


def describe_perplexity(config: Config, loss: float) -> str:
    """``ppl 12.34  `` (exp of the token-mean loss) for a causal LM; empty otherwise."""
    if config.model.task != "causal-lm":
        return ""
    return f"ppl {math.exp(min(loss, 700.0)):.2f}  "


def describe_generation(scores: Mapping[str, float]) -> str:
    """``label 0.9125 (64 answers)  `` for a progress line; empty without scores."""
    named = [(name, value) for name, value in scores.items() if name != "examples"]
    return "".join(f"{name} {value:.4f} ({scores['examples']:.0f} answers)  " for name, value in named)


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
    resume: bool = False,
    bind_client_ids: bool = False,
) -> RunHistory:
    """Run every round on ``grid`` and write the run folder.

    Writes ``out_dir/config.toml`` first; after every round ``checkpoint.pt`` (see
    :mod:`fedpeft.checkpoint`) and then ``metrics.json``; ``adapter/`` (a peft
    checkpoint of the final global adapter) at the end. With ``resume`` the run
    continues after the last round checkpointed in ``out_dir``. With ``bind_client_ids``
    (deployment) each node's first client id is bound to it for the run (see
    :class:`AdapterStrategy`).

    Raises:
        CheckpointError: ``out_dir`` does not suit the run (see :func:`check_run_folder`).
        FederationError: A round got fewer than ``federation.min_train_clients`` usable
            updates ``federation.round_retries + 1`` times in a row.

    """
    checkpoint = open_run_folder(out_dir, config, resume)
    experiment = Experiment.cached(config)
    secure = (
        ProtocolSettings.of(config, experiment.partitions.sizes())
        if config.federation.secure_aggregation.enabled
        else None
    )
    strategy = AdapterStrategy(
        config.federation,
        experiment.codec,
        experiment.new_aggregator(),
        config.seed,
        # Under secure aggregation the clients add the user-level noise, not the server.
        config.privacy.client if secure is None else None,
        capture_plan(config, experiment, out_dir / "captures"),
        partition_sizes=experiment.partitions.sizes(),
        bind_client_ids=bind_client_ids,
    )
    rounds = config.federation.rounds
    clamp = 0.0
    if secure is not None:
        context = CodecContext(config.seed, 1, 0).round_wide()
        clamp = secure.clamp_bound(
            config, payload_layout(experiment.codec, experiment.initial_state, context).size
        )
        check_clamp_bound(config, clamp)
    central = config.privacy.client
    if central.enabled and central.adaptive_clipping:
        expected = config.federation.fraction_train * config.partition.num_clients
        strategy.adaptive_clipping = AdaptiveClipping.of(central, expected)
        if checkpoint is not None and checkpoint.clipping_norm is not None:
            strategy.adaptive_clipping.clipping_norm = checkpoint.clipping_norm
    if checkpoint is not None:
        global_state = dict(checkpoint.global_state)
        ledger = checkpoint.ledger
        history = checkpoint.history
        first_round = checkpoint.completed_round + 1
        strategy.aggregator.load_state_dict(checkpoint.aggregator_state)
        strategy.node_clients = dict(checkpoint.node_clients)
        progress(f"resuming {out_dir} after round {checkpoint.completed_round}/{rounds}")
    else:
        global_state = dict(experiment.initial_state)
        ledger = PrivacyLedger()
        history = new_history(config, experiment, global_state, progress, out_dir)
        first_round = 1
    strategy.run_key = str(history.meta["run_key"])

    def save(completed_round: int, finished: bool = False) -> None:
        checkpoint = RoundCheckpoint(
            completed_round=completed_round,
            config_fingerprint=config.fingerprint(),
            global_state=global_state,
            aggregator_state=strategy.aggregator.state_dict(),
            ledger=ledger,
            history=history,
            finished=finished,
            node_clients=dict(strategy.node_clients),
            clipping_norm=strategy.adaptive_clipping.clipping_norm if strategy.adaptive_clipping else None,
        )
        save_checkpoint(out_dir, checkpoint)
        write_views(out_dir, history, ledger)

    completed = rounds
    for server_round in range(first_round, rounds + 1):
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
        releases_left = client_releases_left(ledger, config, server_round)
        if releases_left == 0:
            note = (
                f"privacy.client.target_epsilon {config.privacy.client.target_epsilon:g} reached: "
                f"round {server_round}'s noised mean would exceed it, so training stops after "
                f"round {server_round - 1} of {rounds}"
            )
            progress(note)
            history.meta.setdefault("warnings", []).append(note)
            completed = server_round - 1
            break
        experiment.prepare_round(server_round)
        secure_events: list[DpEvent] = []
        global_state, traffic, trained = train_round(
            grid, strategy, config, server_round, global_state, progress, secure, secure_events, releases_left
        )
        train_phase_seconds = time.monotonic() - started
        result = evaluate_state(experiment, global_state)
        generation = score_answers(experiment, server_round, out_dir)
        record = RoundRecord(
            round=server_round,
            accuracy=result.accuracy,
            loss=result.loss,
            bytes_up=sum(c.bytes_up for c in traffic.clients),
            bytes_down=sum(traffic.bytes_down_by_node.values()),
            clients=len(traffic.clients),
            seconds=time.monotonic() - started,
            train_loss=mean_train_loss(traffic.clients),
            train_phase_seconds=train_phase_seconds,
            rejected=traffic.rejected,
            per_client=sorted(traffic.clients, key=lambda c: c.client_id),
            aggregation={**stage_metrics, **(traffic.aggregation.metrics if traffic.aggregation else {})},
            generation=generation,
        )
        record_privacy_events(ledger, config, server_round, trained, strategy.releases)
        for event in secure_events:
            ledger.record(event)
        record.privacy.update(privacy_summary(ledger, config, clamp))
        history.rounds.append(record)
        for warning in traffic.aggregation.warnings if traffic.aggregation else ():
            if warning not in history.meta.setdefault("warnings", []):  # once per run, resumes too
                history.meta["warnings"].append(warning)
        # The checkpoint first: it is the record of truth a restart reads; metrics.json
        # and privacy_ledger.json are views of it, rewritten from it on resume.
        save(server_round)
        spent = "".join(
            f"  eps({unit}) {record.privacy[f'epsilon_{unit}']:.3g}"
            for unit in ("example", "client")
            if f"epsilon_{unit}" in record.privacy
        )
        progress(
            f"round {server_round}/{rounds}  acc {record.accuracy:.4f}  loss {record.loss:.4f}  "
            f"{describe_perplexity(config, record.loss)}{describe_generation(generation)}"
            f"up {format_bytes(record.bytes_up)}  down {format_bytes(record.bytes_down)}  "
            f"clients {record.clients}  {record.seconds:.1f} s{spent}"
        )
    experiment.prepare_round(max(completed, 1))  # the final adapter's shape (SLoRA's stage), on resume too
    card = render_model_card(config, history, privacy_summary(ledger, config, clamp), experiment.num_labels)
    save_adapter(
        experiment.model.model,
        global_state,
        out_dir / "adapter",
        config.model.name_or_path,
        card,
        pooling=config.model.pooling,
    )
    save(completed, finished=True)
    return history


def open_run_folder(out_dir: Path, config: Config, resume: bool) -> RoundCheckpoint | None:
    """Check ``out_dir`` (:func:`check_run_folder`), create it and write ``config.toml``."""
    checkpoint = check_run_folder(out_dir, config, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.toml", config.to_toml())  # --resume reads it back
    return checkpoint


def new_history(
    config: Config,
    experiment: Experiment,
    global_state: Mapping[str, Tensor],
    progress: Callable[[str], None],
    out_dir: Path | None = None,
) -> RunHistory:
    """The run's metadata and the initial adapter's central evaluation (round 0).

    Instruction tuning's answers before training go to ``out_dir/generations.json``.
    """
    warnings = config.warnings()  # an unset delta: said at start, kept in metrics.json
    # DP noise that drowns even the best-case clipped signal (fedpeft.privacy.snr).
    coordinates = sum(t.numel() for t in global_state.values())
    warnings += noise_warnings(config, coordinates, experiment.privacy_plan, experiment.partitions.sizes())
    instruction_data = experiment.instruction_report
    if instruction_data is not None:
        progress(instruction_data.describe())
    for warning in warnings:
        progress(f"warning: {warning}")
    experiment.prepare_round(1)
    initial = evaluate_state(experiment, global_state)
    generation = score_answers(experiment, 0, out_dir)
    progress(
        f"round 0/{config.federation.rounds}  acc {initial.accuracy:.4f}  "
        f"loss {initial.loss:.4f}  {describe_perplexity(config, initial.loss)}"
        f"{describe_generation(generation)}(before training)"
    )
    return RunHistory(
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
            # Names this run to its clients; kept in the checkpoint, so a resumed run is
            # the same run to the state they keep on disk.
            "run_key": uuid.uuid4().hex,
            "warnings": warnings,
            **({"instruction_data": instruction_data.as_dict()} if instruction_data else {}),
        },
        initial={
            "accuracy": initial.accuracy,
            "loss": initial.loss,
            **({"generation": generation} if generation else {}),
        },
    )


def train_round(
    grid: Grid,
    strategy: AdapterStrategy,
    config: Config,
    server_round: int,
    global_state: dict[str, Tensor],
    progress: Callable[[str], None],
    secure: ProtocolSettings | None = None,
    secure_events: list[DpEvent] | None = None,
    releases_left: int | None = None,
) -> tuple[dict[str, Tensor], RoundTraffic, list[ClientRoundRecord]]:
    """One round's training exchange, sent again while too few usable updates come back.

    With ``secure`` the exchange is a SecAgg+ round (:mod:`fedpeft.flower.secure_aggregation`);
    the ledger events of its unmasked sums are appended to ``secure_events``. Under a
    user-level privacy budget, ``releases_left`` caps the attempts (each may release a
    noised mean).

    Returns the next global state, the successful attempt's traffic and every client
    that trained in any attempt (each of them spent privacy, aggregated or not).
    """
    federation = config.federation
    trained: list[ClientRoundRecord] = []
    secure_events = secure_events if secure_events is not None else []
    attempts = federation.round_retries + 1
    if releases_left is not None:
        attempts = min(attempts, releases_left)
    for attempt in range(attempts):
        if secure is not None:
            new_arrays, outcome = secure_train_round(
                grid, strategy, config, server_round, state_to_record(global_state), secure
            )
            if outcome.event is not None:  # every unmasked sum is a release, kept or not
                secure_events.append(outcome.event)
        else:
            messages = strategy.configure_train(
                server_round, state_to_record(global_state), ConfigRecord(), grid
            )
            replies = grid.send_and_receive(messages, timeout=federation.round_timeout)
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
        traffic = strategy.traffic
        trained.extend(traffic.clients)
        # A refused aggregate (not finite) leaves the round without a usable update.
        usable = len(traffic.clients) if traffic.refused is None else 0
        # Under user-level DP a round is not sent again for too few replies (that would
        # tell who was absent): its noised mean is released whatever came back.
        released = strategy.central_privacy is not None and traffic.refused is None
        if secure is not None and config.privacy.client.enabled:
            # Clients noised the sum themselves: a round that unmasked one is a release
            # (accounted above) and is not sent again for too few replies.
            released = traffic.refused is None
        if usable >= federation.min_train_clients or released:
            if new_arrays is not None:
                global_state = record_to_state(new_arrays)
            return global_state, traffic, trained
        missing = strategy.sampled - len(traffic.clients) - len(traffic.rejected)
        reasons = [traffic.refused] if traffic.refused else []
        reasons += [f"node {r['node_id']}: {r['reason']}" for r in traffic.rejected[:3]]
        problem = (
            f"round {server_round}: {usable} usable update(s), fewer than "
            f"federation.min_train_clients = {federation.min_train_clients} "
            f"({missing} client(s) silent after {federation.round_timeout:g} s"
            + "".join(f"; {reason}" for reason in reasons)
            + ")"
        )
        if attempt + 1 < attempts:
            progress(f"{problem}; sending the round again ({attempt + 1}/{federation.round_retries})")
    budget = (
        f" (privacy.client.target_epsilon allowed {attempts} noised mean(s) more)"
        if attempts < federation.round_retries + 1
        else ""
    )
    raise FederationError(
        f"{problem}; gave up after {attempts - 1} retries{budget}. The global adapter "
        "of the last completed round is checkpointed: fix the clients and continue with --resume"
    )


def client_releases_left(ledger: PrivacyLedger, config: Config, server_round: int) -> int | None:
    """How many noised means user-level DP's budget still allows, at most a round's attempts.

    None without a budget (``privacy.client.target_epsilon`` unset, or the clients add
    the noise under secure aggregation). Each release is one ``PoissonSampled(q,
    Gaussian(sigma))`` event, as :func:`record_privacy_events` records it.
    """
    central = config.privacy.client
    federation = config.federation
    if not central.enabled or central.target_epsilon is None or federation.secure_aggregation.enabled:
        return None
    spent = ledger.select(SERVER, "client")
    release = DpEvent(server_round, SERVER, "client", central.noise_multiplier, federation.fraction_train, 1)
    for left in range(federation.round_retries + 1):
        epsilon = epsilon_of([*spent, *[release] * (left + 1)], central.delta, central.accountant)
        if epsilon > central.target_epsilon:
            return left
    return federation.round_retries + 1


def check_clamp_bound(config: Config, clamp: float) -> None:
    """Refuse a secure DP run whose noise shares could be clamped with more than delta / 1000.

    Raises:
        ConfigError: Names the probability and the range to raise.

    """
    delta = config.privacy.client.delta
    attempts = config.federation.rounds * (config.federation.round_retries + 1)
    if attempts * clamp > delta / 1000:
        raise ConfigError(
            f"federation.secure_aggregation.clipping_range: clients' noise shares would be clipped "
            f"with probability up to {attempts * clamp:.2g} over the run, more than privacy.client.delta "
            f"/ 1000; raise clipping_range (a power of two) or leave it unset"
        )


def write_views(out_dir: Path, history: RunHistory, ledger: PrivacyLedger) -> None:
    """``metrics.json`` and ``privacy_ledger.json``, the readable copies of the checkpoint."""
    if ledger.events:
        write_json_atomic(out_dir / "privacy_ledger.json", ledger.to_data())
    history.write(out_dir / "metrics.json")


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
        craft=boosted_crafter(experiment, capture.boost_steps) if capture.boost_steps else malicious_adapter,
    )


def boosted_crafter(
    experiment: Experiment, steps: int
) -> Callable[[Mapping[str, Tensor], int], AdapterState]:
    """ReCIT's malicious server: the global adapter fine-tuned on synthetic personal notes."""

    def craft(global_state: Mapping[str, Tensor], seed: int) -> AdapterState:
        from fedpeft.attacks.memorisation_boost import boost_adapter

        return boost_adapter(experiment.model, global_state, steps, seed, device=experiment.device)

    return craft


def record_privacy_events(
    ledger: PrivacyLedger,
    config: Config,
    server_round: int,
    clients: Iterable[ClientRoundRecord],
    releases: Iterable[float],
) -> None:
    """Add the round's DP events: each client's DP-SGD (as it reported) and the server's noise.

    ``releases`` holds the client sample rate q of every noised mean the server
    released in the round (one per attempt that made one): each is one
    ``PoissonSampled(q, Gaussian(noise_multiplier))`` event, as
    :mod:`fedpeft.privacy.central` samples and normalises.
    """
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
        for rate in releases:
            ledger.record(DpEvent(server_round, SERVER, "client", central.noise_multiplier, rate, 1))


def privacy_summary(ledger: PrivacyLedger, config: Config, clamp: float = 0.0) -> dict[str, float]:
    """Epsilon so far per unit, computed from the ledger (the only source of epsilons).

    ``clamp`` bounds the chance that one secure round clamped a client's noise share
    (:meth:`ProtocolSettings.clamp_bound`); every unmasked sum charges it to delta.
    """
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
        epsilon = ledger.epsilon(central.delta, SERVER, "client", central.accountant)
        releases = sum(1 for e in ledger.select(SERVER, "client") if e.mechanism == "skellam")
        summary["epsilon_client"] = epsilon
        summary["delta_client"] = delta_with_clamps(central.delta, epsilon, releases * clamp)
    return summary


def build_server_app(
    config_for: Callable[[Context], Config],
    out_dir_for: Callable[[Context], Path],
    on_finish: Callable[[RunHistory], None] | None = None,
    resume_for: Callable[[Context], bool] = lambda _: False,
    bind_client_ids: bool = False,
) -> ServerApp:
    """A ServerApp running :func:`run_federation` with the config from ``config_for``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        history = run_federation(
            # Deployed, Flower's Grid pulls replies every 3 s; the simulation's every 0.1 s.
            PromptGrid(grid) if isinstance(grid, HttpGrid) else grid,
            config_for(context),
            out_dir_for(context),
            resume=resume_for(context),
            bind_client_ids=bind_client_ids,
        )
        if on_finish is not None:
            on_finish(history)

    return app


app = build_server_app(
    lambda context: with_deployment_defaults(config_from_run_config(context)),
    out_dir_from_run_config,
    resume_for=resume_from_run_config,
    bind_client_ids=True,
)
"""The deployed ServerApp: deployment defaults (a norm bound), client ids bound to nodes."""
