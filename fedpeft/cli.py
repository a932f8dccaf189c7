"""Command line: ``fedpeft simulate | deploy | attack | audit | report | generate | validate``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.errors import FedPeftError

if TYPE_CHECKING:
    from fedpeft.config import Config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML config (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )


def _add_run_folder_args(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--out", type=Path, default=None, help=f"run folder to write{where}")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"continue the unfinished run in DIR{where} after its last completed round "
        "(its config.toml unless --config is given)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="run a federation on Flower's simulation engine")
    _add_config_args(simulate)
    _add_run_folder_args(simulate, "")
    simulate.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")

    deploy = commands.add_parser(
        "deploy",
        help="run a federation on real SuperNodes through a SuperLink (flwr run)",
        description="Validates the config here (as fedpeft validate does: keys, combinations, and the "
        "data read, partitioned and checked against the DP settings, without loading the model), "
        "then submits it whole to the SuperLink named in the Flower configuration file "
        "(server/connect.sh makes one) and streams the run's log. The server writes the run folder "
        "on its own machine.",
    )
    _add_config_args(deploy)
    deploy.add_argument("--superlink", required=True, help="SuperLink connection name (server/connect.sh)")
    deploy.add_argument(
        "--skip-data-check",
        action="store_true",
        help="do not read the configured data here (it lives only on the server and the devices)",
    )
    _add_run_folder_args(deploy, " on the server machine")

    attack = commands.add_parser(
        "attack",
        help="run a federation that captures client updates, then attack them",
        description="Runs the config's federation on the simulation engine with [capture] on "
        "(the server saves the decoded updates it receives), then the [attack] on each "
        "captured update, scored against the batch the client really trained on.",
    )
    _add_config_args(attack)
    attack.add_argument("--out", type=Path, required=True, help="run folder to write")
    attack.add_argument(
        "--captures",
        type=Path,
        default=None,
        help="attack the captures in this folder instead of running the federation",
    )
    attack.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")

    audit = commands.add_parser(
        "audit",
        help="run federations with planted canaries and examples, then write a privacy audit report",
        description="Runs the config's federation once per [audit] compare variant (e.g. no DP and "
        "DP-SGD at epsilon 8) with canaries and membership examples planted in the [audit] clients' "
        "data, then writes OUT/report.html, report.json and report.md: the guarantees of the privacy "
        "ledger, attacks on captured updates, canary exposure, membership inference, an empirical "
        "epsilon lower bound and a verdict.",
    )
    _add_config_args(audit)
    audit.add_argument("--out", type=Path, required=True, help="folder for the report and the variants' runs")
    audit.add_argument(
        "--show-secrets", action="store_true", help="print canary secrets and recovered text unmasked"
    )
    audit.add_argument(
        "--rerun",
        action="store_true",
        help="run every federation again even if OUT/runs holds a finished run of the same config",
    )
    audit.add_argument(
        "--report-only",
        action="store_true",
        help="judge the verdict again and rewrite the report from OUT/report.json's measurements "
        "(no training)",
    )

    report = commands.add_parser(
        "report",
        help="compare run folders in one self-contained HTML page (and PNGs)",
        description="Reads each RUN folder's metrics.json (and config.toml and privacy_ledger.json "
        "where present; an unfinished run shows the rounds it completed) and writes OUT/report.html, "
        "one page with every figure embedded, and OUT/figures/*.png: test accuracy and loss, bytes "
        "up and down per round and summed, and epsilon per round, one line per run; with a table of "
        "each run's settings and final metrics.",
    )
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder (repeatable)")
    report.add_argument(
        "--out", type=Path, default=Path("report"), help="folder to write report.html into (default: report)"
    )

    generate = commands.add_parser(
        "generate",
        help="answer prompts with a run's causal LM and adapter",
        description="Loads the base model the run trained (its config.toml) with its final adapter "
        "(RUN/adapter) and answers each prompt greedily, rendered as the run trained (the chat "
        "template or the plain template, with the run's system prompt).",
    )
    generate.add_argument("--run", type=Path, required=True, help="run folder (config.toml and adapter/)")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    prompts.add_argument("--file", type=Path, help="a text file with one prompt per line")
    generate.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's setting")

    validate = commands.add_parser(
        "validate",
        help="check a config and its data, and print the config resolved",
        description="Checks every key and combination, then reads the data files (every row must "
        "have its text and label, in UTF-8), partitions them and checks the DP settings against "
        "the partitions (delta below 1/n, a reachable target_epsilon), without loading the model. "
        "Prints the resolved config; warnings and the data summary go to stderr.",
    )
    _add_config_args(validate)

    worker = commands.add_parser(
        "worker",
        help="keep a device's ClientApp warm: run its SuperNode's tasks with the model loaded",
        description="A long-lived process that runs every ClientApp task of a SuperNode started "
        "with --isolation process, in place of a fresh flwr-clientapp process per message: the "
        "model and data stay loaded between rounds. clients/start_supernode.sh --warm-worker "
        "starts both. See docs/deployment.md.",
    )
    worker.add_argument(
        "--runtime-api",
        default="127.0.0.1:9094",
        metavar="HOST:PORT",
        help="the SuperNode's runtime API (flower-supernode --port; default 127.0.0.1:9094)",
    )
    worker.add_argument("--parent-pid", type=int, help="exit once this process (the SuperNode) is gone")
    return parser


def _run_target(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    """The config, run folder and resume flag of ``simulate`` or ``deploy``."""
    from fedpeft.config import load_config
    from fedpeft.errors import ConfigError

    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise ConfigError("--resume DIR continues the run in DIR: leave --out out")
        if args.config is None and not args.resume.is_dir():
            raise ConfigError(f"--resume {args.resume}: no such run folder")
        config_path = args.config if args.config is not None else args.resume / "config.toml"
        return load_config(config_path, args.overrides), args.resume, True
    if args.out is None:
        raise ConfigError("give --out DIR (a new run) or --resume DIR (continue one)")
    return load_config(args.config, args.overrides), args.out, False


def _simulate(args: argparse.Namespace) -> None:
    from fedpeft.flower.server_app import format_bytes
    from fedpeft.flower.simulation import run_simulation

    config, out_dir, resume = _run_target(args)
    args.out = out_dir
    history = run_simulation(config, out_dir, verbose=args.verbose, resume=resume)
    rounds = history.rounds
    print()
    print(
        f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'bytes up':>10}  "
        f"{'bytes down':>10}  {'clients':>7}  {'seconds':>7}"
    )
    for r in rounds:
        print(
            f"{r.round:>5}  {r.accuracy:>8.4f}  {r.loss:>7.4f}  {format_bytes(r.bytes_up):>10}  "
            f"{format_bytes(r.bytes_down):>10}  {r.clients:>7}  {r.seconds:>7.1f}"
        )
    meta = history.meta
    total_up = sum(r.bytes_up for r in rounds)
    total_down = sum(r.bytes_down for r in rounds)
    print(
        f"\nfinal accuracy {rounds[-1].accuracy:.4f}; traffic up {format_bytes(total_up)}, "
        f"down {format_bytes(total_down)}; adapter {format_bytes(meta['adapter_bytes'])} "
        f"vs full model {format_bytes(meta['base_model_bytes'])}"
    )
    spent = rounds[-1].privacy
    for unit in ("example", "client"):
        if f"epsilon_{unit}" in spent:
            print(
                f"privacy ({unit}-level): epsilon {spent[f'epsilon_{unit}']:.3f} at delta "
                f"{spent[f'delta_{unit}']:g}, from {args.out}/privacy_ledger.json"
            )
    print(f"wrote {args.out}/config.toml, metrics.json and adapter/")


def _who(client_id: int, clients: tuple[int, ...]) -> str:
    """A capture's column in the attack table: its client, or ``sum`` for a secure round's sum."""
    from fedpeft.attacks.capture import SUM_CLIENT_ID

    return "sum" if client_id == SUM_CLIENT_ID else str(client_id)


def _who_long(client_id: int, clients: tuple[int, ...]) -> str:
    """Whose update a capture is, in words."""
    from fedpeft.attacks.capture import SUM_CLIENT_ID

    if client_id == SUM_CLIENT_ID:
        return "sum of clients " + "+".join(str(c) for c in clients)
    return f"client {client_id}"


def _attack(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from fedpeft.attacks import ATTACKS
    from fedpeft.attacks.capture import SUM_CLIENT_ID, load_captures
    from fedpeft.attacks.evaluation import attack_captures
    from fedpeft.config import load_config
    from fedpeft.errors import ConfigError
    from fedpeft.experiment import Experiment
    from fedpeft.flower.simulation import run_simulation

    config = load_config(args.config, args.overrides)
    if not config.capture.rounds:
        raise ConfigError("capture.rounds: empty, so no update is captured to attack")
    attack = ATTACKS.build(config.attack.name, config.attack.options, "attack.options")
    folder = args.captures
    if folder is None:
        run_simulation(config, args.out, verbose=args.verbose)
        folder = args.out / "captures"
    captures = load_captures(folder)
    print(f"attack {config.attack.name} on {len(captures)} captured update(s) from {folder}")
    experiment = Experiment.cached(config)
    outcomes = attack_captures(experiment, captures, attack)
    tokenizer = experiment.model.tokenizer
    print(
        f"\n{'round':>5} {'client':>6} {'threat':>9} {'tok P':>6} {'tok R':>6} "
        f"{'R-1':>6} {'R-2':>6} {'R-L':>6} {'exact':>6} {'s':>6}"
    )
    for o in outcomes:
        m = o.metrics
        print(
            f"{o.server_round:>5} {_who(o.client_id, o.clients):>6} {o.threat_model:>9} "
            f"{m.token_precision:>6.3f} "
            f"{m.token_recall:>6.3f} {m.rouge1:>6.3f} {m.rouge2:>6.3f} {m.rougeL:>6.3f} "
            f"{m.exact_sequence_rate:>6.3f} {o.seconds:>6.1f}"
        )
    for o in outcomes:
        shown = list(o.reconstruction.sequences) or [o.reconstruction.token_ids]
        for true, found in list(zip(o.truth, shown, strict=False))[: config.attack.show_examples]:
            print(f"\nround {o.server_round} {_who_long(o.client_id, o.clients)}")
            print(f"  true:      {tokenizer.decode(list(true), skip_special_tokens=True)}")
            print(f"  recovered: {tokenizer.decode(list(found), skip_special_tokens=True)}")
    report = {
        "attack": config.attack.name,
        "options": config.attack.options,
        "config_fingerprint": config.fingerprint(),
        "captures": str(folder),
        "outcomes": [
            {
                "round": o.server_round,
                "client": o.client_id,
                "clients": list(o.clients),
                "sum": o.client_id == SUM_CLIENT_ID,
                "threat_model": o.threat_model,
                "seconds": o.seconds,
                "metrics": asdict(o.metrics),
                "details": o.reconstruction.details,
                "batch_size": len(o.truth),
            }
            for o in outcomes
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attack.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\nwrote {args.out / 'attack.json'}")


def _audit(args: argparse.Namespace) -> None:
    from fedpeft.audit.report import refresh_verdict, write_report
    from fedpeft.audit.run import load_report, run_audit
    from fedpeft.config import load_config

    if args.report_only:
        write_report(refresh_verdict(load_report(args.out)), args.out)
        print(f"rewrote {args.out}/report.html and report.md (and the verdict) from report.json")
        return
    config = load_config(args.config, args.overrides)
    report = run_audit(config, args.out, show_secrets=args.show_secrets, reuse=not args.rerun)
    print()
    for flag in report["flags"]:
        print(f"!!! {flag['variant']}: {flag['message']}")
    print(report["verdict"]["summary"])
    print(
        f"{'variant':<16} {'epsilon':>8} {'bound':>7} {'AUC loss':>8} {'AUC LiRA':>8} "
        f"{'exposure':>8} {'acc':>6}"
    )
    for v in report["variants"]:
        aucs = {a["name"]: a["auc"] for a in (v["membership"] or {}).get("attacks", [])}
        bounds = [b["epsilon_lower_bound"] for b in v["one_run"] if b["source"] == "membership examples"]
        canaries = v["canaries"] or {}
        eps = v["reported_example_epsilon"]

        def show(value: float | None, digits: int = 3) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        print(
            f"{v['name']:<16} {'inf' if eps is None else f'{eps:.2f}':>8} "
            f"{show(bounds[0] if bounds else None, 2):>7} {show(aucs.get('loss')):>8} "
            f"{show(aucs.get('lira_online')):>8} {show(canaries.get('mean_exposure_included'), 2):>8} "
            f"{v['utility']['accuracy']:>6.3f}"
        )
    print(f"wrote {args.out}/report.html, report.json and report.md")


def _report(args: argparse.Namespace) -> None:
    from fedpeft.report import write_run_report
    from fedpeft.report.runs import shown_path

    written = write_run_report(args.runs, args.out)
    for run in written.runs:
        print(f"{run.label}: {run.status}, {len(run.rounds)} round(s) from {run.shown_path}")
    print(
        f"wrote {shown_path(written.html.resolve())} and {len(written.figures)} figures in "
        f"{shown_path(written.html.parent.resolve() / 'figures')}/"
    )


def _generate(args: argparse.Namespace) -> None:
    import json

    from fedpeft.config import load_config
    from fedpeft.errors import ConfigError, DataError
    from fedpeft.generation import generate
    from fedpeft.models import load_adapter
    from fedpeft.training import resolve_device

    config_path, adapter = args.run / "config.toml", args.run / "adapter"
    if not config_path.is_file() or not adapter.is_dir():
        raise DataError(f"--run {args.run}: not a finished run folder (needs config.toml and adapter/)")
    config = load_config(config_path)
    if config.model.task != "causal-lm":
        raise ConfigError(f"--run {args.run}: model.task is {config.model.task!r}, not a causal LM")
    if args.file is not None:
        if not args.file.is_file():
            raise DataError(f"--file: file not found: {args.file}")
        texts = [line.strip() for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = args.prompt
    if not texts:
        raise DataError("no prompt given (--prompt TEXT, or --file with one prompt per line)")
    instruction = config.data.instruction
    system = [{"role": "system", "content": instruction.system_prompt}] if instruction.system_prompt else []
    chats = [[*system, {"role": "user", "content": text}] for text in texts]
    loaded = load_adapter(adapter, config.model)
    device = resolve_device(config.train.device)
    answers = generate(
        loaded.model,
        loaded.tokenizer,
        chats,
        instruction,
        device,
        args.max_new_tokens or instruction.max_new_tokens,
        progress=lambda done, total: print(f"answered {done}/{total}", file=sys.stderr),
    )
    for text, answer in zip(texts, answers, strict=True):
        print(json.dumps({"prompt": text, "generated": answer}) if args.file else answer)


def _deploy(args: argparse.Namespace) -> int:
    from fedpeft.flower.deployment import deploy

    config, out_dir, resume = _run_target(args)
    if not args.skip_data_check:
        _check_data(config)
    _print_warnings(config)
    return deploy(config, args.superlink, out_dir, resume)


def _validate(args: argparse.Namespace) -> None:
    from fedpeft.config import load_config

    config = load_config(args.config, args.overrides)
    _check_data(config)
    _print_warnings(config)
    print(config.to_toml(), end="")


def _check_data(config: Config) -> None:
    """Read, check and partition the data and check DP against it; no model is loaded.

    Raises:
        DataError: A file is missing, unreadable, or a row lacks a field (file and line named).
        ConfigError: The partitions cannot be made, or a DP setting does not fit them.

    """
    from fedpeft.experiment import Experiment

    experiment = Experiment(config)  # not the cached one: nothing here is kept
    _ = experiment.privacy_plan  # reads the data, partitions it, checks delta and target_epsilon
    sizes = experiment.partitions.sizes()
    print(
        f"fedpeft: data: {len(experiment.data.train)} training rows in {len(sizes)} partitions "
        f"({min(sizes)}..{max(sizes)} examples), {len(experiment.data.test)} test rows",
        file=sys.stderr,
    )


def _print_warnings(config: Config) -> None:
    for warning in config.warnings():
        print(f"fedpeft: warning: {warning}", file=sys.stderr)


def _worker(args: argparse.Namespace) -> int:
    from fedpeft.flower.client_app import app
    from fedpeft.flower.warm_worker import serve

    print(f"fedpeft worker: running the ClientApp tasks of the SuperNode at {args.runtime_api}", flush=True)
    serve(args.runtime_api, app, parent_pid=args.parent_pid)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "filelock", "alembic", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "verbose", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # Library deprecation notices are for fedpeft's developers, not its users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    commands = {
        "simulate": _simulate,
        "deploy": _deploy,
        "attack": _attack,
        "audit": _audit,
        "report": _report,
        "generate": _generate,
        "validate": _validate,
        "worker": _worker,
    }
    try:
        code = commands[args.command](args)
    except FedPeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
