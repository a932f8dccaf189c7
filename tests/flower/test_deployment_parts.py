"""The parts of a deployment that need no running SuperLink: node config, fault
injection, the run config ``fedpeft deploy`` sends, the CLI's run-folder checks, and the
server scripts' refusals (certificates, the CA key)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import tomllib
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedpeft.cli import main
from fedpeft.config import parse_config
from fedpeft.errors import ConfigError
from fedpeft.flower.client_app import client_id_of, config_for_node
from fedpeft.flower.deployment import (
    DEPLOYMENT_MAX_UPDATE_NORM,
    deploy_command,
    deployment_norm_note,
    with_deployment_defaults,
)
from fedpeft.flower.fault_injection import (
    OVERSIZE_BYTES,
    InjectedDropout,
    corrupt_update,
    fault_of_round,
    inject_faults,
)
from fedpeft.flower.records import ROUND_CONFIG, record_to_state, state_to_record
from fedpeft.flower.run_config import config_from_run_config, resume_from_run_config


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


def context(node_config: dict | None = None, run_config: dict | None = None) -> Context:
    return Context(
        run_id=1, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config=run_config or {}
    )


def round_message(server_round: int) -> Message:
    content = RecordDict({ROUND_CONFIG: ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_node_config_sets_the_device_and_the_devices_own_data(tiny_config_data: dict, tmp_path: Path) -> None:
    config = parse_config(tiny_config_data)
    assert config_for_node(config, {"partition-id": 1}) is config
    own = tmp_path / "mine.tsv"
    own.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n", encoding="utf-8")
    node = config_for_node(config, {"partition-id": 7, "device": "cpu", "data-file": str(own)})
    assert node.train.device == "cpu"
    assert node.data.train == str(own.resolve())
    assert (node.partition.scheme, node.partition.num_clients) == ("iid", 1)
    assert node.model == config.model and node.federation == config.federation


def test_bad_node_config_is_named(tiny_config_data: dict, tmp_path: Path) -> None:
    config = parse_config(tiny_config_data)
    with pytest.raises(ConfigError, match=r"data-file.*not found on this device"):
        config_for_node(config, {"data-file": str(tmp_path / "missing.tsv")})
    with pytest.raises(ConfigError, match=r"train\.device"):
        config_for_node(config, {"device": "tpu"})
    with pytest.raises(ConfigError, match="partition-id"):
        client_id_of(context({"partition-id": -1}))
    with pytest.raises(ConfigError, match="lacks 'partition-id'"):
        client_id_of(context({}))


def test_fault_list_cycles_over_rounds_and_unknown_kinds_fail() -> None:
    assert [fault_of_round("nan,none,oversize", round_message(r)) for r in (1, 2, 3, 4)] == [
        "nan",
        "none",
        "oversize",
        "nan",
    ]
    with pytest.raises(ConfigError, match=r"'fault'.*each entry one of"):
        fault_of_round("nan,explode", round_message(1))


def secure_message(stage: str, server_round: int) -> Message:
    """A SecAgg+ message as Flower's workflow sends it: the round only in its group id."""
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN, group_id=str(server_round))


def test_secagg_drop_after_keys_fails_only_the_masked_vector_stage_of_its_rounds() -> None:
    node = context({"partition-id": 0, "fault": "none,secagg-drop-after-keys"})
    answered: list[Message] = []

    def honest(msg: Message, _: Context) -> Message:
        answered.append(msg)
        return msg

    key_stages = [secure_message(stage, 2) for stage in (Stage.SETUP, Stage.SHARE_KEYS)]
    passing = [
        *key_stages,  # round 2 drops, but only once its keys are out
        secure_message(Stage.COLLECT_MASKED_VECTORS, 1),  # round 1: 'none'
        secure_message(Stage.UNMASK, 1),
        round_message(2),  # a plain round has no keys to drop after: an honest reply
    ]
    for msg in passing:
        assert inject_faults(msg, node, honest) is msg
    assert answered == passing
    with pytest.raises(InjectedDropout, match="round 2 after sharing keys"):
        inject_faults(secure_message(Stage.COLLECT_MASKED_VECTORS, 2), node, honest)
    assert len(answered) == len(passing)  # it did not train


def test_the_default_norm_note_says_who_clips_under_secure_aggregation(tiny_config_data: dict) -> None:
    plain = parse_config(tiny_config_data)
    assert "every client update is clipped" in deployment_norm_note(plain, sent_to_clients=True)
    tiny_config_data["federation"]["secure_aggregation"] = {"enabled": True}
    secure = parse_config(tiny_config_data)
    sent = deployment_norm_note(secure, sent_to_clients=True)
    assert "cannot clip single updates" in sent and "each client clips its own update" in sent
    assert "were not sent this bound" in deployment_norm_note(secure, sent_to_clients=False)
    said: list[str] = []
    bounded = with_deployment_defaults(secure, said.append, sent_to_clients=True)
    assert bounded.federation.max_update_norm == DEPLOYMENT_MAX_UPDATE_NORM and said == [sent]


def test_corrupted_updates_are_what_the_server_must_reject() -> None:
    record = state_to_record({"a": torch.ones(3, 2), "b": torch.zeros(4)})
    nan = record_to_state(corrupt_update(record, "nan"))
    assert all(torch.isnan(t).all() for t in nan.values())
    inf = record_to_state(corrupt_update(record, "inf"))
    assert all(torch.isinf(t).all() for t in inf.values())
    shapes = {k: tuple(t.shape) for k, t in record_to_state(corrupt_update(record, "wrong-shape")).items()}
    assert shapes == {"a": (2, 2), "b": (3,)}
    big = record_to_state(corrupt_update(record, "oversize"))
    assert big["junk"].numel() * 4 == OVERSIZE_BYTES and torch.equal(big["a"], torch.ones(3, 2))


def test_run_config_carries_the_whole_config_and_resume(tiny_config_data: dict) -> None:
    config = parse_config(tiny_config_data)
    got = config_from_run_config(context(run_config={"config-toml": config.to_toml()}))
    assert got.fingerprint() == config.fingerprint()
    assert resume_from_run_config(context(run_config={"resume": True})) is True
    assert resume_from_run_config(context(run_config={})) is False
    with pytest.raises(ConfigError, match="'resume'"):
        resume_from_run_config(context(run_config={"resume": "yes"}))


def test_deploy_command_sends_the_validated_config(tiny_config_data: dict, tmp_path: Path) -> None:
    config = parse_config(tiny_config_data)
    run_config_file = tmp_path / "run-config.toml"
    command = deploy_command(config, "prod", Path("runs/x"), True, run_config_file)
    assert command[1:3] == ["run", str(Path(__file__).resolve().parents[2])]
    assert command[3:5] == ["prod", "--stream"] and command[-2:] == ["--run-config", str(run_config_file)]
    sent = tomllib.loads(run_config_file.read_text(encoding="utf-8"))
    assert parse_config(tomllib.loads(sent["config-toml"])).fingerprint() == config.fingerprint()
    assert sent["out-dir"] == str(Path("runs/x").resolve()) and sent["resume"] is True


def test_cli_wants_out_or_resume_and_resume_needs_a_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate"]) == 2
    assert "--out DIR (a new run) or --resume DIR" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["deploy", "--superlink", "x", "--resume", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "leave --out out" in capsys.readouterr().err


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["bash", str(root / name), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_certificates_keep_the_ca_key_apart_and_an_existing_ca_is_not_replaced(tmp_path: Path) -> None:
    made = script("server/make_certificates.sh", "trial/certs", "fl.example.org", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    certs, private = tmp_path / "trial" / "certs", tmp_path / "trial" / "ca-private"
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "server.crt", "server.key"]
    assert stat.S_IMODE((private / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert "ca-private/ca.key" in made.stdout
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    names = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in names and "DNS:fl.example.org" in names  # loopback: the Control address

    ca = (certs / "ca.crt").read_bytes()
    again = script("server/make_certificates.sh", "trial/certs", cwd=tmp_path)
    assert again.returncode == 2 and "refusing to replace" in again.stderr and "--force" in again.stderr
    assert str(Path("trial/certs/ca.crt")) in again.stderr and "fedpeft trial CA" in again.stderr
    assert (certs / "ca.crt").read_bytes() == ca

    forced = script(
        "server/make_certificates.sh", "--force", "--ca-key-dir", "offline", "trial/certs", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert (certs / "ca.crt").read_bytes() != ca and (tmp_path / "offline" / "ca.key").is_file()
    assert not (certs / "ca.key").exists()


def test_start_superlink_refuses_a_certs_folder_holding_the_ca_key(tmp_path: Path) -> None:
    for name in ("ca.crt", "server.crt", "server.key", "ca.key"):
        (tmp_path / name).write_text("placeholder")
    refused = script("server/start_superlink.sh", "--certs", str(tmp_path), cwd=tmp_path)
    assert refused.returncode == 2 and "ca.key" in refused.stderr and "Move it out" in refused.stderr
    assert not (tmp_path / "superlink-state").exists()  # refused before anything started


def test_start_supernode_refuses_a_thread_count_that_is_not_a_positive_integer(tmp_path: Path) -> None:
    for name in ("ca.crt", "node.key"):
        (tmp_path / name).write_text("placeholder")
    args = ["--superlink", "127.0.0.1:1", "--ca", "ca.crt", "--key", "node.key", "--partition-id", "0"]
    for threads in ("0", "two", "-1"):
        refused = script("clients/start_supernode.sh", *args, "--threads", threads, cwd=tmp_path)
        assert (
            refused.returncode == 2
            and f"--threads: expected a positive integer, got '{threads}'" in refused.stderr
        )
