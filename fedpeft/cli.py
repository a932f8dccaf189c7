"""Command line: ``fedpeft simulate | validate``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from fedpeft.errors import FedPeftError


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="run a federation on Flower's simulation engine")
    _add_config_args(simulate)
    simulate.add_argument("--out", type=Path, required=True, help="run folder to write")
    simulate.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")

    validate = commands.add_parser("validate", help="check a config and print it resolved")
    _add_config_args(validate)
    return parser


def _simulate(args: argparse.Namespace) -> None:
    from fedpeft.config import load_config
    from fedpeft.flower.server_app import format_bytes
    from fedpeft.flower.simulation import run_simulation

    config = load_config(args.config, args.overrides)
    history = run_simulation(config, args.out, verbose=args.verbose)
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


def _validate(args: argparse.Namespace) -> None:
    from fedpeft.config import load_config

    print(load_config(args.config, args.overrides).to_toml(), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "verbose", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # Library deprecation notices are for fedpeft's developers, not its users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        {"simulate": _simulate, "validate": _validate}[args.command](args)
    except FedPeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
