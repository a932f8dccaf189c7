"""What federated instruction tuning buys: task scores of the base model and of the
federated adapter, over seeds, on this machine's CPUs.

Tasks, each a federation run through the real CLI (``fedpeft simulate``) once per seed
(SmolLM2-135M-Instruct, the offline model; LoRA r 8 on q/v; 4 IID clients):

``sst2-label``: ``configs/instruct-smollm2.toml`` (the embedded SST-2 subset asked as
"positive or negative?"), scored by the label word of the greedy answer.
``gsm8k``: GSM8K's worked solutions (``../shared/data/gsm8k``) as answers, scored by
exact match of the final ``#### n``; a 135M model solves few of these problems, so
what it can gain in a few rounds is mostly the answer format.

Every row reports ``before`` (the base model: round 0 of the same run, the adapter at
its initialisation, which adds nothing since LoRA's B starts at zero) and ``after``
(the last round), both from the run's ``metrics.json``: the task score of greedy answers
to the first test prompts (for GSM8K also ``final_answer_rate``, the share of answers
ending in ``#### n`` at all), and the held-out response loss. Prints a table and writes
JSON whose ``rows`` carry ``task``, ``metric``, ``before``, ``after`` (means over
``seeds``), ``after_std``, ``seeds``, plus a few answers before and after training.
Finished runs are reused (an interrupted benchmark resumes).

    python benchmarks/instruct.py --seeds 0,1,2 --out runs/bench/instruct \\
        --json docs/figures/instruct.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _paths import repo_relative
from _simulate import ROOT, finished, simulate

from fedpeft.config import apply_overrides, parse_config


@dataclass(frozen=True)
class Task:
    name: str
    scorer: str
    overrides: tuple[str, ...] = ()


SHARED_GSM8K = "../shared/data/gsm8k"
TASKS = [
    Task("sst2-label", "label", ("data.instruction.generation_examples=128",)),
    Task(
        "gsm8k",
        "exact_match",
        (
            f"data.train={SHARED_GSM8K}/train.jsonl",
            f"data.test={SHARED_GSM8K}/test.jsonl",
            "data.max_length=320",
            "data.max_train_examples=2000",
            "data.max_test_examples=64",
            "data.instruction.format=qa",
            "data.instruction.prompt_template=''",
            "data.instruction.response_template=''",
            "data.instruction.value_words={}",
            "data.instruction.system_prompt=''",
            "data.instruction.scorer=exact_match",
            "data.instruction.generation_examples=64",
            "data.instruction.max_new_tokens=200",
            "train.batch_size=4",
            "train.eval_batch_size=16",
        ),
    ),
]
WORKLOAD = "configs/instruct-smollm2.toml"


def run_task(task: Task, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """One task at one seed: reuse a finished run of the same config, else simulate it."""
    workload = tomllib.loads((ROOT / WORKLOAD).read_text(encoding="utf-8"))
    config = apply_overrides(workload, [*task.overrides, f"seed={seed}", *extra])
    name = f"{task.name}/seed-{seed}"
    parse_config(config, name)
    folder = out / task.name / f"seed-{seed}"
    run = finished(folder, config)
    print(f"{name}: {'reusing finished run' if run else 'running'}", flush=True)
    run = run or simulate(name, config, folder)
    metrics = run["metrics"]
    samples = json.loads((folder / "generations.json").read_text(encoding="utf-8"))
    last = metrics["rounds"][-1]
    return {
        "before": {**scores(metrics["initial"]["generation"]), "response_loss": metrics["initial"]["loss"]},
        "after": {**scores(last["generation"]), "response_loss": last["loss"]},
        "samples_before": samples["0"],
        "samples_after": samples[str(last["round"])],
        "wall_seconds": run["wall_seconds"],
        "folder": repo_relative(folder),
    }


def scores(generation: dict[str, float]) -> dict[str, float]:
    """A round's task scores (the scorer's and its companions), without the answer count."""
    return {name: value for name, value in generation.items() if name != "examples"}


def summarise(task: Task, runs: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per task score (``exact_match`` comes with ``final_answer_rate``) and the loss."""
    seeds = sorted(runs)
    metrics = [task.scorer, *(m for m in runs[seeds[0]]["after"] if m != task.scorer)]
    rows = []
    for metric in metrics:
        after = [runs[s]["after"][metric] for s in seeds]
        rows.append(
            {
                "task": task.name,
                "metric": metric,
                "before": statistics.fmean(runs[s]["before"][metric] for s in seeds),
                "after": statistics.fmean(after),
                "after_std": statistics.stdev(after) if len(after) > 1 else None,
                "after_per_seed": after,
                "seeds": seeds,
                "workload": WORKLOAD,
                "overrides": list(task.overrides),
                "wall_seconds_mean": statistics.fmean(runs[s]["wall_seconds"] for s in seeds),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=",".join(t.name for t in TASKS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/instruct"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    wanted = args.tasks.split(",")
    unknown = sorted(set(wanted) - {t.name for t in TASKS})
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {[t.name for t in TASKS]}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, samples = [], {}
    for task in (t for t in TASKS if t.name in wanted):
        runs = {seed: run_task(task, seed, args.out, args.extra) for seed in seeds}
        rows += summarise(task, runs)
        first = runs[seeds[0]]
        samples[task.name] = {
            "seed": seeds[0],
            "before": first["samples_before"],
            "after": first["samples_after"],
        }
    print(f"\n{'task':<12} {'metric':<14} {'before':>8} {'after':>16} seeds")
    for row in rows:
        spread = f" ± {row['after_std']:.3f}" if row["after_std"] is not None else ""
        print(
            f"{row['task']:<12} {row['metric']:<14} {row['before']:>8.3f} {row['after']:>8.3f}{spread:<8} {row['seeds']}"
        )
    if args.json:
        result = {"rows": rows, "samples": samples, "extra_overrides": args.extra}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {repo_relative(args.json)}")


if __name__ == "__main__":
    main()
