"""A device's saved state: where it may live, and that it survives a crash."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpeft.errors import ClientStateError
from fedpeft.flower import client_state
from fedpeft.flower.client_state import (
    LEDGER_FILE,
    MEMORY_FILE,
    ClientState,
    load_client_state,
    save_client_state,
    state_folder,
)
from fedpeft.history import write_json_atomic, write_text_atomic
from fedpeft.privacy.ledger import DpEvent, PrivacyLedger
from tests.flower.test_checkpoint_resume import (
    InProcessGrid,
    app_for,
    config_for,
    run,
    server_identity,  # noqa: F401 - an autouse fixture, imported to apply here
)

KEY = uuid.uuid4().hex


def node(state_dir: Path, partition: object = 0) -> Context:
    """A fresh Flower context (a new Flower run) of a SuperNode keeping state on disk."""
    config = {"partition-id": partition, "state-dir": str(state_dir)}
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})  # type: ignore[arg-type]


def ledger_of(rounds: int) -> PrivacyLedger:
    return PrivacyLedger(
        [
            DpEvent(round=r, party="0", unit="example", noise_multiplier=1.0, sample_rate=0.1, steps=5)
            for r in range(1, rounds + 1)
        ]
    )


def saved(tmp_path: Path, rounds: int = 2) -> Path:
    state = ClientState(memory={"w": torch.arange(6.0).reshape(2, 3)}, ledger=ledger_of(rounds))
    save_client_state(node(tmp_path), KEY, state)
    folder = state_folder(node(tmp_path), KEY)
    assert folder is not None
    return folder


@pytest.mark.parametrize(
    "key",
    [
        "../../..",
        "..",
        "/etc",
        "../" + KEY,
        KEY + "/../..",
        KEY.upper(),
        str(uuid.uuid4()),
        KEY[:-1],
        KEY + "0",
    ],
)
def test_a_run_key_not_shaped_like_the_servers_is_refused(tmp_path: Path, key: str) -> None:
    state_dir = tmp_path / "state"
    with pytest.raises(ClientStateError, match="run key"):
        save_client_state(node(state_dir), key, ClientState(ledger=ledger_of(1)))
    with pytest.raises(ClientStateError, match="run key"):
        load_client_state(node(state_dir), key)
    assert not any(tmp_path.rglob(LEDGER_FILE))


def test_a_servers_run_key_makes_a_folder_under_state_dir(tmp_path: Path) -> None:
    folder = state_folder(node(tmp_path / "state"), KEY)
    assert folder == (tmp_path / "state").resolve() / KEY / "client-0"


def test_a_symlinked_run_folder_leading_out_of_state_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / KEY).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ClientStateError, match="outside state-dir"):
        state_folder(node(tmp_path / "state"), KEY)


def test_a_partition_id_that_is_not_an_integer_never_reaches_the_path(tmp_path: Path) -> None:
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="partition-id"):
        state_folder(node(tmp_path, partition="../x"), KEY)


def test_state_round_trips_through_a_new_flower_run(tmp_path: Path) -> None:
    saved(tmp_path)
    state = load_client_state(node(tmp_path), KEY)
    assert torch.equal(state.memory["w"], torch.arange(6.0).reshape(2, 3))
    assert state.ledger.events == ledger_of(2).events


def test_every_state_file_and_its_folder_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    folder = saved(tmp_path)
    files = [p for p in synced if Path(p).parent == folder and not Path(p).is_dir()]
    # Each temporary file before its rename (two copies of two files), then the folder.
    assert len(files) == 4
    assert synced.count(str(folder)) >= 4


@pytest.mark.parametrize("damage", [b"", b'[{"round": 1', b"\xff\xfe", b"{}", b"[1, 2]"])
def test_an_unreadable_ledger_is_recovered_from_its_backup(tmp_path: Path, damage: bytes) -> None:
    folder = saved(tmp_path, rounds=3)
    (folder / LEDGER_FILE).write_bytes(damage)  # what a power loss without fsync leaves
    assert load_client_state(node(tmp_path), KEY).ledger.events == ledger_of(3).events


def test_the_ledger_with_more_rounds_wins(tmp_path: Path) -> None:
    folder = saved(tmp_path, rounds=3)
    # A crash between the two copies: the backup already holds the newer round.
    write_json_atomic(folder / (LEDGER_FILE + ".bak"), ledger_of(4).to_data())
    assert len(load_client_state(node(tmp_path), KEY).ledger.events) == 4


def test_an_unreadable_ledger_without_a_good_copy_stops_the_client(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    (folder / LEDGER_FILE).write_bytes(b"")
    (folder / (LEDGER_FILE + ".bak")).write_bytes(b"not json")
    with pytest.raises(ClientStateError, match=f"{LEDGER_FILE}.*under-count epsilon"):
        load_client_state(node(tmp_path), KEY)


def test_unreadable_codec_memory_falls_back_to_the_backup_then_to_empty(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    (folder / MEMORY_FILE).write_bytes(b"")
    assert torch.equal(load_client_state(node(tmp_path), KEY).memory["w"], torch.arange(6.0).reshape(2, 3))
    (folder / (MEMORY_FILE + ".bak")).write_bytes(b"\x08" + b"\x00" * 7 + b"{bad json")
    assert load_client_state(node(tmp_path), KEY).memory == {}


def test_an_atomic_write_that_fails_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    write_text_atomic(path, "seed = 1\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "seed = 2\n\udcff")  # fails halfway through writing
    assert path.read_text(encoding="utf-8") == "seed = 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


@pytest.mark.parametrize("key", ["../../..", "/tmp/x"])
def test_a_client_declines_a_round_whose_run_key_is_bad(
    tiny_config_data: dict, tmp_path: Path, key: str
) -> None:
    from flwr.app import ConfigRecord, Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.config import parse_config
    from fedpeft.experiment import Experiment
    from fedpeft.flower.client_app import build_client_app
    from fedpeft.flower.records import DECLINED, GLOBAL_ADAPTER, ROUND_CONFIG, state_to_record

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    experiment = Experiment(parse_config(tiny_config_data))
    Experiment._cache[experiment.config.fingerprint()] = experiment
    content = RecordDict(
        {
            GLOBAL_ADAPTER: state_to_record(experiment.initial_state),
            ROUND_CONFIG: ConfigRecord({"server-round": 1, "run-key": key}),
        }
    )
    message = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    reply = build_client_app(lambda _: experiment.config)(message, node(tmp_path / "state"))
    assert f"run key {key!r}" in str(reply.content.config_records[DECLINED]["reason"])
    assert not (tmp_path / "state").exists() and not any(tmp_path.rglob(LEDGER_FILE))


def test_with_a_state_folder_the_state_lives_on_disk_only(tmp_path: Path) -> None:
    # Flower keeps every virtual client's context in the simulation's process: state put
    # there would grow it by a client's residuals for every client that ever trained.
    context = node(tmp_path)
    state = ClientState(memory={"w": torch.ones(3)}, ledger=ledger_of(1))
    save_client_state(context, KEY, state)
    assert not context.state.array_records and not context.state.config_records
    assert torch.equal(load_client_state(node(tmp_path), KEY).memory["w"], torch.ones(3))


def test_the_simulations_state_dir_stands_in_for_the_node_configs(tmp_path: Path) -> None:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 4}, state=RecordDict(), run_config={})  # type: ignore[arg-type]
    save_client_state(context, KEY, ClientState(ledger=ledger_of(2)), state_dir=tmp_path)
    assert (tmp_path / KEY / "client-4" / LEDGER_FILE).is_file()
    assert load_client_state(context, KEY, state_dir=tmp_path).ledger.events == ledger_of(2).events
    # Without any state folder the state stays in Flower's context, as before.
    bare = Context(run_id=1, node_id=1, node_config={"partition-id": 4}, state=RecordDict(), run_config={})  # type: ignore[arg-type]
    save_client_state(bare, KEY, ClientState(ledger=ledger_of(2)))
    assert load_client_state(bare, KEY).ledger.events == ledger_of(2).events


def test_only_the_sampled_cohorts_state_is_ever_loaded(
    tiny_config_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory and disk reads grow with the cohort, not with every client that exists.
    six_clients = {**tiny_config_data, "partition": {"scheme": "iid", "num_clients": 6}}
    config = config_for(
        six_clients, codec="topk", codec_options={"density": 0.1}, fraction_train=0.5, rounds=2
    )
    loaded: list[int] = []
    real_load = client_state.load_client_state

    def spy(context: Context, *args: object, **kwargs: object) -> ClientState:
        loaded.append(int(context.node_config["partition-id"]))  # type: ignore[arg-type]
        return real_load(context, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_state, "load_client_state", spy)
    nodes = {100 + i: {"partition-id": i, "state-dir": str(tmp_path / "state")} for i in range(6)}
    grid = InProcessGrid(app_for(config), nodes)
    sent: list[int] = []
    deliver = grid.send_and_receive

    def record(messages, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        sent.extend(nodes[m.metadata.dst_node_id]["partition-id"] for m in messages)
        return deliver(messages, timeout)

    grid.send_and_receive = record  # type: ignore[method-assign]
    history = run(config, tmp_path / "run", grid)

    trained = [c.client_id for r in history.rounds for c in r.per_client]
    assert [r.clients for r in history.rounds] == [3, 3]
    assert sorted(loaded) == sorted(sent) == sorted(trained)
    on_disk = {int(p.name.removeprefix("client-")) for p in (tmp_path / "state").glob("*/client-*")}
    assert on_disk == set(trained)
