"""The round loop's guards over a whole run: node bindings and aggregator warnings survive
a resume (in-process ClientApps, as in test_checkpoint_resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.checkpoint import load_checkpoint
from fedpeft.flower.server_app import run_federation
from tests.flower.test_checkpoint_resume import (
    Crash,
    InProcessGrid,
    app_for,
    config_for,
    honest_nodes,
    server_identity,  # noqa: F401 - autouse fixture
)


def test_bindings_and_warnings_survive_a_resume(tiny_config_data: dict, tmp_path: Path) -> None:
    config = config_for(tiny_config_data, aggregator="trimmed_mean")
    folder = tmp_path / "run"

    def run(nodes: dict[int, dict], **grid_options: object):
        grid = InProcessGrid(app_for(config), nodes, **grid_options)
        return run_federation(
            grid, config, folder, progress=lambda _: None, bind_client_ids=True, resume=resume
        )

    resume = False
    with pytest.raises(Crash):
        run(honest_nodes(), crash_on_call=3)
    checkpoint = load_checkpoint(folder)
    assert checkpoint is not None and checkpoint.node_clients == {100: 0, 101: 1, 102: 2}

    # After the restart node 102 is gone and node 999 speaks for its client.
    resume = True
    history = run({100: {"partition-id": 0}, 101: {"partition-id": 1}, 999: {"partition-id": 2}})
    last = history.rounds[-1]
    assert [c.client_id for c in last.per_client] == [0, 1]
    assert [r["reason"] for r in last.rejected] == ["client 2 is bound to node 102; node 999 claims it"]

    # A trimmed mean over 3 clients (rounds 1, 2), then 2 (round 3) cuts nothing: each
    # said once, not once per round, and the list survives the resume.
    warnings = json.loads((folder / "metrics.json").read_text())["warnings"]
    assert [w for w in warnings if w.startswith("trimmed_mean:")] == [
        f"trimmed_mean: beta = 0.2 cuts no value with {n} client(s) (it needs at least 5); the round is the plain mean"
        for n in (3, 2)
    ]
