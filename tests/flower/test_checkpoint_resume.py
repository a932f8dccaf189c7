"""The server's round loop against clients run in-process: checkpoints, resume, retries
and bad replies. The same ServerApp code runs in simulation and deployment; here the
grid delivers each message to the real ClientApp (fault mod included) in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedpeft.checkpoint import CheckpointError, load_checkpoint
from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from fedpeft.flower.client_app import build_client_app
from fedpeft.flower.fault_injection import inject_faults
from fedpeft.flower.server_app import FederationError, run_federation


@pytest.fixture(autouse=True)
def server_identity() -> None:
    """Messages are created inside a Flower task; outside a runtime, declare one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


class Crash(Exception):
    """The server process dying mid-run."""


class InProcessGrid:
    """Flower's Grid, as run_federation uses it, delivering to ClientApps in this process.

    Args:
        app: The ClientApp every node runs.
        node_configs: node id -> the node's --node-config.
        silent: node id -> rounds (attempts counted) in which the node never replies.
        crash_on_call: raise :class:`Crash` on this send_and_receive call (1-based).

    """

    def __init__(self, app, node_configs: dict[int, dict], silent=None, crash_on_call: int | None = None):
        self.app = app
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={})
            for node, cfg in node_configs.items()
        }
        self.silent = silent or {}
        self.crash_on_call = crash_on_call
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise Crash(f"server killed during call {self.calls}")
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.calls in self.silent.get(node, ()):
                continue
            replies.append(self.app(msg, self.contexts[node]))
        return replies


def config_for(tiny_config_data: dict, **federation) -> object:
    data = {
        **tiny_config_data,
        "train": {"steps": 3, "batch_size": 8, "lr": 5e-3},
        "federation": {
            "rounds": 3,
            "min_train_clients": 2,
            "min_available_clients": 3,
            "max_payload_bytes": 8 * 2**20,
            **federation,
        },
    }
    config = parse_config(data)
    Experiment._cache.pop(config.fingerprint(), None)
    return config


def honest_nodes(n: int = 3) -> dict[int, dict]:
    return {100 + i: {"partition-id": i} for i in range(n)}


def run(config, folder: Path, grid: InProcessGrid, resume: bool = False):
    return run_federation(grid, config, folder, progress=lambda _: None, resume=resume)


def app_for(config):
    return build_client_app(lambda _: config, mods=[inject_faults])


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoint_after_every_round_and_resume_equals_an_uninterrupted_run(
    tiny_config_data: dict, tmp_path: Path
) -> None:
    config = config_for(tiny_config_data)
    run(config, tmp_path / "whole", InProcessGrid(app_for(config), honest_nodes()))

    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(config, crashed, InProcessGrid(app_for(config), honest_nodes(), crash_on_call=3))
    checkpoint = load_checkpoint(crashed)
    assert checkpoint is not None and checkpoint.completed_round == 2 and not checkpoint.finished
    assert [r["round"] for r in json.loads((crashed / "metrics.json").read_text())["rounds"]] == [1, 2]

    # A fresh run may not overwrite the unfinished one...
    with pytest.raises(CheckpointError, match=r"unfinished run .* after round 2"):
        run(config, crashed, InProcessGrid(app_for(config), honest_nodes()))
    # ...and a resume with another config is refused, naming both fingerprints.
    other = config_for(tiny_config_data, round_retries=5)
    with pytest.raises(CheckpointError, match="another config"):
        run(other, crashed, InProcessGrid(app_for(other), honest_nodes()), resume=True)

    grid = InProcessGrid(app_for(config), honest_nodes())
    history = run(config, crashed, grid, resume=True)
    assert grid.calls == 1  # only round 3 was trained again
    assert [r.round for r in history.rounds] == [1, 2, 3]
    assert_bit_identical(adapter_tensors(tmp_path / "whole"), adapter_tensors(crashed))
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((crashed / "metrics.json").read_text())
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in whole["rounds"]]
    final = load_checkpoint(crashed)
    assert final is not None and final.finished and final.completed_round == 3


def test_resumed_ledger_counts_every_round_once(tiny_config_data: dict, tmp_path: Path) -> None:
    config = config_for(tiny_config_data)
    data = config.to_dict()
    data["privacy"] = {"client": {"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 1.0}}
    config = parse_config(data)
    run(config, tmp_path / "whole", InProcessGrid(app_for(config), honest_nodes()))
    with pytest.raises(Crash):
        run(config, tmp_path / "resumed", InProcessGrid(app_for(config), honest_nodes(), crash_on_call=3))
    run(config, tmp_path / "resumed", InProcessGrid(app_for(config), honest_nodes()), resume=True)

    events = json.loads((tmp_path / "resumed" / "privacy_ledger.json").read_text())
    assert [e["round"] for e in events] == [1, 2, 3]
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["rounds"]
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["rounds"]
    assert [r["privacy"]["epsilon_client"] for r in resumed] == [
        r["privacy"]["epsilon_client"] for r in whole
    ]


def test_rogue_replies_are_rejected_and_leave_the_adapter_bit_identical(
    tiny_config_data: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(tiny_config_data, min_available_clients=3)
    run(config, tmp_path / "honest", InProcessGrid(app_for(config), honest_nodes()))

    nodes = {**honest_nodes(), 999: {"partition-id": 2, "fault": "nan,oversize,wrong-shape"}}
    with caplog.at_level("WARNING", logger="fedpeft"):
        history = run(config, tmp_path / "rogue", InProcessGrid(app_for(config), nodes))

    reasons = [r.rejected for r in history.rounds]
    assert [len(r) for r in reasons] == [1, 1, 1]
    assert all(r[0]["node_id"] == 999 and r[0]["client_id"] == 2 for r in reasons)
    assert "non-finite" in reasons[0][0]["reason"] or "NaN" in reasons[0][0]["reason"]
    assert "max_payload_bytes" in reasons[1][0]["reason"]
    assert "shape" in reasons[2][0]["reason"]
    assert "rejected update from node 999 (client 2)" in caplog.text
    assert_bit_identical(adapter_tensors(tmp_path / "honest"), adapter_tensors(tmp_path / "rogue"))


def test_a_round_with_too_few_replies_is_sent_again(tiny_config_data: dict, tmp_path: Path) -> None:
    config = config_for(tiny_config_data, min_train_clients=3, rounds=2)
    messages: list[str] = []
    # Node 102 is silent on the first attempt of round 1 (call 1), then recovers.
    grid = InProcessGrid(app_for(config), honest_nodes(), silent={102: {1}})
    history = run_federation(grid, config, tmp_path / "run", progress=messages.append)
    assert grid.calls == 3  # round 1 twice, round 2 once
    assert [r.clients for r in history.rounds] == [3, 3]
    assert any("fewer than federation.min_train_clients = 3" in m and "again (1/2)" in m for m in messages)


def test_a_round_that_never_gets_enough_replies_stops_the_run_with_its_checkpoint(
    tiny_config_data: dict, tmp_path: Path
) -> None:
    config = config_for(tiny_config_data, min_train_clients=3, round_retries=1)
    # From call 2 on (round 2 and its retry) node 102 is gone.
    grid = InProcessGrid(app_for(config), honest_nodes(), silent={102: {2, 3, 4}})
    with pytest.raises(FederationError, match=r"round 2: 2 usable .* gave up after 1 retries"):
        run(config, tmp_path / "run", grid)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.completed_round == 1


def test_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: not a readable fedpeft checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep_state", [True, False])
def test_client_residuals_survive_a_resume_only_with_a_state_dir(
    tiny_config_data: dict, tmp_path: Path, keep_state: bool
) -> None:
    config = config_for(tiny_config_data, codec="topk", codec_options={"density": 0.1})

    def nodes() -> dict[int, dict]:
        extra = {"state-dir": str(tmp_path / "device-state")} if keep_state else {}
        return {100 + i: {"partition-id": i, **extra} for i in range(3)}

    run(config, tmp_path / "whole", InProcessGrid(app_for(config), nodes()))
    with pytest.raises(Crash):
        run(config, tmp_path / "resumed", InProcessGrid(app_for(config), nodes(), crash_on_call=3))
    # New contexts: a resumed run is a new Flower run, whose Context.state starts empty.
    run(config, tmp_path / "resumed", InProcessGrid(app_for(config), nodes()), resume=True)
    whole, resumed = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "resumed")
    same = all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert same == keep_state


def test_client_epsilon_continues_across_a_resume_with_a_state_dir(
    tiny_config_data: dict, tmp_path: Path
) -> None:
    config = config_for(tiny_config_data)
    data = config.to_dict()
    data["privacy"] = {"example": {"enabled": True, "noise_multiplier": 1.0}}
    config = parse_config(data)
    nodes = {100 + i: {"partition-id": i, "state-dir": str(tmp_path / "device-state")} for i in range(3)}
    whole = run(config, tmp_path / "whole", InProcessGrid(app_for(config), nodes))
    with pytest.raises(Crash):
        run(config, tmp_path / "resumed", InProcessGrid(app_for(config), nodes, crash_on_call=3))
    resumed = run(config, tmp_path / "resumed", InProcessGrid(app_for(config), nodes), resume=True)

    def reported(history) -> list[list[float]]:
        return [[c.epsilon for c in r.per_client] for r in history.rounds]

    # Each client's own epsilon after round 3 composes rounds 1-3, as without the crash.
    assert reported(resumed) == reported(whole)
    assert reported(resumed)[2][0] > reported(resumed)[1][0] > reported(resumed)[0][0]
