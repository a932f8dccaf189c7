"""``fedpeft audit``: run each privacy variant's federation with planted examples, then measure it.

For each variant of ``audit.compare`` (see :mod:`fedpeft.audit.variants`):

1. the federation runs in its own ``fedpeft simulate`` process (a fresh Flower/Ray
   runtime per variant) into ``<out>/runs/<variant>``, with the audit's canaries and
   membership examples planted in the chosen clients' data and ``[capture]`` as
   configured; a folder holding a finished run of the same config is reused;
2. the final global adapter is loaded here and measured: canary exposure, the loss
   attack, shadow adapters and LiRA, one-run epsilon lower bounds, the attack suite on
   the captured updates, and the guarantees from the run's privacy ledger.

The report (:mod:`fedpeft.audit.report`) puts the variants side by side.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedpeft.audit.guarantees import example_epsilon, guarantees_section
from fedpeft.audit.measure import (
    canary_section,
    losses_of,
    mask_secret,
    membership_section,
    one_run_section,
)
from fedpeft.audit.plan import AuditPlan
from fedpeft.audit.shadows import ShadowLosses, train_shadows
from fedpeft.audit.variants import variant_config, variant_name
from fedpeft.checkpoint import load_checkpoint
from fedpeft.config import Config
from fedpeft.errors import AttackError, ConfigError, FedPeftError
from fedpeft.experiment import Experiment
from fedpeft.flower.launch import simulate_in_child
from fedpeft.models import load_adapter_state


class AuditError(FedPeftError):
    """A variant's federation failed or left no finished run to audit."""


def run_federation_process(config: Config, run_dir: Path, on_round: Callable[[], None]) -> None:
    """``fedpeft simulate`` ``config`` into ``run_dir`` in a child process; log in ``run_dir/log.txt``.

    Raises:
        AuditError: The process failed (the log's last lines are in the message).

    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir.parent / f"{run_dir.name}.toml"
    config_file.write_text(config.to_toml(), encoding="utf-8")
    log_path = run_dir / "log.txt"

    def count_rounds(line: str) -> None:
        if line.startswith("round ") and "(before training)" not in line and "/" in line.split()[1]:
            on_round()

    code = simulate_in_child(config_file, run_dir, log_path, count_rounds)
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-5:])
        raise AuditError(f"the federation of {run_dir.name} failed (exit {code}); {log_path}:\n{tail}")


def finished_run(config: Config, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``config``."""
    checkpoint = load_checkpoint(run_dir) if (run_dir / "checkpoint.pt").is_file() else None
    return (
        checkpoint is not None
        and checkpoint.finished
        and checkpoint.config_fingerprint == config.fingerprint()
    )


def attack_section(
    experiment: Experiment, run_dir: Path, plan: AuditPlan, show_secrets: bool
) -> dict[str, Any]:
    """The configured attack on the variant's captured updates, or why it did not run.

    Under secure aggregation the captures are the rounds' sums: each outcome row says so
    (``sum``, ``client`` -1) and names the summed ``clients``.
    """
    config = experiment.config
    if not config.capture.rounds:
        return {"status": "skipped", "reason": "no [capture] rounds configured", "attack": config.attack.name}
    from fedpeft.attacks import ATTACKS
    from fedpeft.attacks.capture import SUM_CLIENT_ID, load_captures
    from fedpeft.attacks.evaluation import attack_captures

    attack = ATTACKS.build(config.attack.name, config.attack.options, "attack.options")
    try:
        captures = load_captures(run_dir / "captures")
        outcomes = attack_captures(
            experiment, captures, attack, [c.secret for c in plan.canaries], progress=False
        )
    except AttackError as err:
        return {"status": "skipped", "attack": config.attack.name, "reason": str(err)}
    tokenizer = experiment.model.tokenizer
    rows, examples = [], []
    for outcome in outcomes:
        rows.append(
            {
                "round": outcome.server_round,
                # Under secure aggregation: -1, the round's sum of ``clients``' updates.
                "client": outcome.client_id,
                "clients": list(outcome.clients),
                "sum": outcome.client_id == SUM_CLIENT_ID,
                "threat_model": outcome.threat_model,
                "batch_size": config.train.batch_size,
                "sequences": len(outcome.truth),
                "seconds": outcome.seconds,
                **asdict(outcome.metrics),
            }
        )
        shown = list(outcome.reconstruction.sequences) or [outcome.reconstruction.token_ids]
        for true, found in list(zip(outcome.truth, shown, strict=False))[: config.attack.show_examples]:
            true_text = str(tokenizer.decode(list(true), skip_special_tokens=True))
            found_text = str(tokenizer.decode(list(found), skip_special_tokens=True))
            if not show_secrets:
                true_text, found_text = (
                    mask_secret(true_text, plan.canaries),
                    mask_secret(found_text, plan.canaries),
                )
            examples.append(
                {
                    "round": outcome.server_round,
                    "client": outcome.client_id,
                    "clients": list(outcome.clients),
                    "sum": outcome.client_id == SUM_CLIENT_ID,
                    "true": true_text,
                    "recovered": found_text,
                }
            )
    worst = sorted(rows, key=lambda r: (-r["token_recall"], -r["rougeL"]))[:3]
    return {
        "status": "ran",
        "attack": config.attack.name,
        "reason": None,
        "outcomes": rows,
        "worst": [{k: r[k] for k in ("round", "client", "clients", "sum")} for r in worst],
        "examples": examples,
    }


def audit_variant(
    base: Config,
    spec: str,
    out_dir: Path,
    show_secrets: bool,
    bar: tqdm,
    reuse: bool = True,
    shadow_threads: int | None = None,
) -> dict[str, Any]:
    """Run (or reuse) one variant's federation and measure its final adapter.

    ``shadow_threads``: torch threads while the shadows train (None: as set).
    """
    config = variant_config(base, spec)
    name = variant_name(spec)
    run_dir = out_dir / "runs" / name
    started = time.monotonic()
    bar.set_postfix_str(f"{name}: federation")
    if reuse and finished_run(config, run_dir):
        bar.update(config.federation.rounds)
    else:
        if run_dir.exists():
            # A stale or unfinished run of another config: the audit owns this folder.
            shutil.rmtree(run_dir)
        run_federation_process(config, run_dir, lambda: bar.update(1))
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None or not checkpoint.finished:
        raise AuditError(f"{run_dir}: the federation left no finished checkpoint")
    experiment = Experiment.cached(config)
    plan = experiment.audit_plan
    if plan is None:
        raise ConfigError(
            "audit: plant canaries or membership examples ([audit] canaries, membership_examples)"
        )
    history = checkpoint.history
    guarantees = guarantees_section(config, checkpoint.ledger, experiment.partitions.sizes())
    reported = example_epsilon(guarantees, list(plan.clients))

    bar.set_postfix_str(f"{name}: canaries and membership")
    model = experiment.model.model
    load_adapter_state(model, checkpoint.global_state)
    canaries = canary_section(experiment, plan, show_secrets)
    target_losses = losses_of(experiment, [e.text for e in plan.examples], [e.label for e in plan.examples])
    bar.update(1)
    attacks = attack_section(experiment, run_dir, plan, show_secrets)
    bar.update(1)
    shadows: ShadowLosses | None = None
    if plan.examples and config.audit.shadow_models:
        bar.set_postfix_str(f"{name}: shadow models")
        threads = torch.get_num_threads()
        torch.set_num_threads(shadow_threads or threads)
        try:
            shadows = train_shadows(experiment, config.audit.shadow_models, lambda _: bar.update(1))
        finally:
            torch.set_num_threads(threads)
        load_adapter_state(model, checkpoint.global_state)
    membership = membership_section(plan, target_losses, shadows)
    # The delta of the bound that was reported (user-level DP's when only it is on).
    delta = config.privacy.example.delta if config.privacy.example.enabled else config.privacy.client.delta
    one_run = one_run_section(membership, canaries, reported, delta, config.audit.confidence)
    if membership is not None:
        membership = {k: v for k, v in membership.items() if k not in ("scores", "included")}
    last = history.rounds[-1]
    return {
        "name": name,
        "spec": spec,
        "config_fingerprint": config.fingerprint(),
        "run_dir": str(run_dir),
        "seconds": time.monotonic() - started,
        "utility": {
            "accuracy": last.accuracy,
            "loss": last.loss,
            "initial_accuracy": history.initial["accuracy"],
        },
        "batch_size": config.train.batch_size,
        "secure_aggregation": config.federation.secure_aggregation.enabled,
        "reported_example_epsilon": reported,
        "guarantees": guarantees,
        "canaries": canaries,
        "membership": membership,
        "one_run": one_run,
        "attacks": attacks,
    }


def stages_of(config: Config) -> int:
    """Progress-bar steps of one variant: rounds, scoring, attacks, shadows."""
    shadows = config.audit.shadow_models if config.audit.membership_examples else 0
    return config.federation.rounds + 2 + shadows


def run_audit(
    config: Config, out_dir: Path, show_secrets: bool = False, reuse: bool = True
) -> dict[str, Any]:
    """Audit every variant of ``config.audit.compare``; write and return the report.

    Raises:
        ConfigError: Nothing is planted to audit.
        AuditError: A federation failed.

    """
    from fedpeft.audit.report import build_report, write_report

    if not config.audit.enabled:
        raise ConfigError(
            "audit: plant canaries or membership examples ([audit] canaries, membership_examples)"
        )
    for spec in config.audit.compare:
        # Data, the plan and DP calibration fail here, with the key named, before any training.
        experiment = Experiment.cached(variant_config(config, spec))
        _ = experiment.audit_plan, experiment.privacy_plan
    # The audit's own scoring gets one simulated client's CPUs: on a shared machine two
    # torch threads per process thrash (measured 10x slower DP-SGD steps on 2 busy
    # cores), and a client of the federation was given this much anyway. The shadow
    # federations get torch's default back: nothing else runs while they train (the
    # variant's federation process has ended), and on 2 idle cores a shadow of the
    # default audit took 68 s with both threads against 111 s with one.
    shadow_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.simulation.num_cpus_per_client)))
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = []
    total = len(config.audit.compare) * stages_of(config)
    with tqdm(total=total, desc="audit", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        for spec in config.audit.compare:
            variants.append(audit_variant(config, spec, out_dir, show_secrets, bar, reuse, shadow_threads))
    report = build_report(config, variants)
    write_report(report, out_dir)
    (out_dir / "audit-config.toml").write_text(config.to_toml(), encoding="utf-8")
    return report


def load_report(out_dir: Path) -> dict[str, Any]:
    """Read ``report.json`` back."""
    return json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
