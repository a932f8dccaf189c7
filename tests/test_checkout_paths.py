"""A fresh checkout is enough: every config names embedded data or says how to pass a
missing file, and the committed figure files name no folder of the machine that made them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedpeft.cli import main
from fedpeft.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.toml"))
FIGURES = sorted((REPO / "docs" / "figures").glob("*.json"))
MACHINE_PATH = re.compile(r"(^|[\s'\"(=:,])(/[A-Za-z_.~]|~/|[A-Za-z]:\\)|site-packages")
"""An absolute path at the start of a string or after a separator (a slash then a name,
so that a model's "2480 / 4" in a recorded answer is not one), or a site-packages folder."""


def strings(data: Any) -> Iterator[str]:
    """Every string in parsed JSON, keys included."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield key
            yield from strings(value)
    elif isinstance(data, list):
        for item in data:
            yield from strings(item)


def test_the_figure_check_sees_absolute_paths() -> None:
    found = [
        s
        for s in ("/work/main/configs/a.toml", "wrote /tmp/x", "C:\\runs", "lib/site-packages/x")
        if MACHINE_PATH.search(s)
    ]
    assert len(found) == 4
    assert not any(
        MACHINE_PATH.search(s)
        for s in ("configs/agnews.toml", "../shared/data/agnews/train.tsv", "a/b", "So, 2480 / 4 = 624.")
    )


@pytest.mark.parametrize("figure", FIGURES, ids=lambda p: p.name)
def test_figure_files_record_paths_relative_to_the_repository(figure: Path) -> None:
    absolute = [s for s in strings(json.loads(figure.read_text(encoding="utf-8"))) if MACHINE_PATH.search(s)]
    assert not absolute, f"{figure.name} records paths of the machine that wrote it: {absolute[:3]}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_use_embedded_data_or_a_relative_path(path: Path) -> None:
    data = load_config(path).data
    for key, location in (("data.train", data.train), ("data.test", data.test)):
        portable = location.startswith("builtin:") or data.format == "hf" or not Path(location).is_absolute()
        assert portable, f"{path.name}: {key} = {location!r} names a folder of one machine"


EXTERNAL = [p for p in CONFIGS if not load_config(p).data.train.startswith("builtin:")]


@pytest.mark.parametrize("path", EXTERNAL, ids=lambda p: p.name)
def test_a_config_whose_data_a_checkout_lacks_says_how_to_pass_it(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # a working folder with nothing beside it
    assert main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    location = load_config(path).data.train
    assert err[-1] == (
        f"fedpeft: error: data.train: file not found: {location} (relative to the working folder "
        f"{tmp_path}); give the file with --set data.train=PATH"
    )
