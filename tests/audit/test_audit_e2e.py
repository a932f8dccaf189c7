"""End to end: `fedpeft audit` runs two real federations (no DP and strong DP-SGD) with
canaries and membership examples planted, and reports on them.

The setting is deliberately leaky: random labels on sentences of rare words (nothing to
generalise, everything to memorise), a small data set seen for many epochs, and a
classifier wide enough to memorise it. Under no DP the audit must see the leak; under
epsilon 0.5 it must see (close to) nothing.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomli_w

from fedpeft.audit.report import validate_report
from tests.conftest import save_tiny_bert

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")


def _leaky_config(folder: Path, tokenizer_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model = save_tiny_bert(
        folder / "bert", tokenizer_dir, hidden_size=128, intermediate_size=256, num_attention_heads=4
    )
    vocab = sorted(
        w for w in AutoTokenizer.from_pretrained(str(tokenizer_dir)).vocab if w.isalpha() and len(w) > 3
    )
    rng = random.Random(7)
    for split, n in (("train", 140), ("test", 60)):
        rows = [f"{' '.join(rng.choice(vocab) for _ in range(6))}\t{rng.randrange(2)}" for _ in range(n)]
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return {
        "seed": 0,
        "model": {"name_or_path": str(model)},
        "adapter": {
            "method": "lora",
            "r": 16,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["query", "value"],
        },
        "data": {"train": str(folder / "train.tsv"), "test": str(folder / "test.tsv"), "max_length": 16},
        "partition": {"scheme": "iid", "num_clients": 2},
        "train": {"steps": 80, "batch_size": 8, "lr": 0.01},
        "federation": {"rounds": 8, "min_train_clients": 2, "min_available_clients": 2},
        "audit": {
            "canaries": 24,
            "canary_repetitions": 8,
            "canary_digits": 6,
            "references": 255,
            "membership_examples": 80,
            "clients": [0, 1],
            "shadow_models": 2,
            "compare": ["none", "example:0.5"],
        },
    }


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("audit")
    config = folder / "audit.toml"
    config.write_text(tomli_w.dumps(_leaky_config(folder, minilm_tokenizer_dir)), encoding="utf-8")
    out = folder / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "audit", "--config", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "audit: 100%" in proc.stderr  # the progress bar ran to the end
    return out


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def _variant(out: Path, name: str) -> dict[str, Any]:
    [variant] = [v for v in _report(out)["variants"] if v["name"] == name]
    return variant


def test_report_json_validates_against_the_schema(audited: Path) -> None:
    report = _report(audited)
    validate_report(report)
    assert len(report["fedpeft_version"]) > 0 and len(report["config_fingerprint"]) == 16
    assert {f["id"] for f in report["figures"]} >= {
        "epsilon_over_rounds",
        "exposure_histogram",
        "roc_curves",
        "attack_vs_epsilon",
    }
    broken = json.loads(json.dumps(report))
    broken["variants"][0]["membership"]["attacks"][0]["auc"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)


def test_leaky_setting_reports_high_exposure_and_auc(audited: Path) -> None:
    leaky = _variant(audited, "none")
    aucs = {a["name"]: a["auc"] for a in leaky["membership"]["attacks"]}
    assert max(aucs.values()) > 0.8, aucs
    canaries = leaky["canaries"]
    # Inserted canaries rank high among 255 references (8 bits at most); never inserted
    # ones sit near the chance level of about 1.4 bits.
    included, excluded = canaries["mean_exposure_included"], canaries["mean_exposure_excluded"]
    assert included > 3.5 and included - excluded > 1.5, canaries
    assert excluded < 2.5, canaries
    assert leaky["reported_example_epsilon"] is None
    assert leaky["guarantees"]["dp"] is False
    verdict = {v["variant"]: v for v in _report(audited)["verdict"]["variants"]}
    assert verdict["none"]["level"] == "high"


def test_strong_dp_reports_near_chance(audited: Path) -> None:
    private = _variant(audited, "example-eps-0.5")
    [unit] = private["guarantees"]["units"]
    assert unit["unit"] == "example" and unit["epsilon_max"] == pytest.approx(0.5, abs=0.01)
    membership = private["membership"]
    for attack in membership["attacks"]:
        assert abs(attack["auc"] - 0.5) < 3 * membership["auc_null_std"], attack["name"]
    assert private["canaries"]["mean_exposure_included"] < 3.5
    for bound in private["one_run"]:
        assert not bound["violation"] and (bound["epsilon_lower_bound"] or 0) <= bound["reported_epsilon"]
    assert not _report(audited)["flags"]


def test_secrets_are_masked_by_default(audited: Path) -> None:
    report_text = (audited / "report.json").read_text(encoding="utf-8")
    html = (audited / "report.html").read_text(encoding="utf-8")
    items = _variant(audited, "none")["canaries"]["items"]
    assert all(item["text"].endswith("• • • •") for item in items)
    assert "my secret code is • • • •" in html
    assert not any(ch.isdigit() for item in items for ch in item["text"])
    assert "secrets_shown" in report_text


def test_markdown_has_every_section(audited: Path) -> None:
    text = (audited / "report.md").read_text(encoding="utf-8")
    for heading in (
        "## Verdict",
        "## 1. Guarantees",
        "## 2. Attacks",
        "## 3. Canary exposure",
        "## 4. Membership inference",
        "## 5. Empirical epsilon lower bound",
    ):
        assert heading in text
    for png in ("epsilon_over_rounds", "exposure_histogram", "roc_curves", "attack_vs_epsilon"):
        assert f"figures/{png}.png" in text and (audited / "figures" / f"{png}.png").stat().st_size > 1000


def test_html_is_self_contained_and_renders_in_headless_chromium(audited: Path, tmp_path: Path) -> None:
    html = (audited / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 4
    assert "src='http" not in html and "<script" not in html
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium not installed (apt-get install chromium; .ci/run installs it)")
    screenshot = tmp_path / "report.png"
    screenshot_page(audited / "report.html", screenshot, tmp_path / "profile")
    assert_not_blank(screenshot)


def screenshot_page(page: Path, png: Path, profile: Path, width: int = 1200, height: int = 2000) -> None:
    """Render ``page`` in headless Chromium and save a screenshot."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        f"--window-size={width},{height}",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    shutil.rmtree(profile, ignore_errors=True)


def assert_not_blank(png: Path) -> None:
    """The screenshot shows a page: many colours, real contrast, ink spread over the height."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    gray = pixels.mean(axis=2)
    assert gray.std() > 10, f"screenshot looks blank (pixel std {gray.std():.2f})"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    inked_rows = (gray < 200).any(axis=1).mean()
    assert inked_rows > 0.3, f"only {100 * inked_rows:.0f} % of rows hold any ink"


def test_a_federated_shadow_given_the_targets_half_is_the_target_again(audited: Path) -> None:
    # Every client trains in every round here, so a shadow federation with the target's
    # own examples planted retraces the Flower run: what makes shadows "trained the way
    # the target was". With the other half it ends elsewhere. One torch thread, as each
    # simulated client (and the audit) had: 640 steps of memorising random labels turn
    # another summation order into an O(1) difference.
    import torch

    from fedpeft.audit.shadows import federate_shadow
    from fedpeft.audit.variants import variant_config
    from fedpeft.checkpoint import load_checkpoint
    from fedpeft.config import load_config
    from fedpeft.experiment import Experiment
    from fedpeft.models import adapter_state

    experiment = Experiment(variant_config(load_config(audited / "audit-config.toml"), "none"))
    plan = experiment.audit_plan
    assert plan is not None and _variant(audited, "none")["membership"]["shadow_training"] == "federated"
    checkpoint = load_checkpoint(audited / "runs" / "none")
    assert checkpoint is not None
    target = checkpoint.global_state

    def distance(mask: list[bool]) -> float:
        federate_shadow(experiment.with_audit_plan(plan.with_membership(mask)), shadow=0)
        state = adapter_state(experiment.model.model)
        return max(float((state[n] - target[n]).abs().max() / target[n].abs().max()) for n in target)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        same = distance([e.included for e in plan.examples])
        other = distance([not e.included for e in plan.examples])
    finally:
        torch.set_num_threads(threads)
    assert same < 1e-6 and other > 0.1, (same, other)
