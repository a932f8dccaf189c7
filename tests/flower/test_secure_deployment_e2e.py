"""Secure aggregation deployed: a SuperLink and SuperNodes as separate processes on
localhost (TLS, node authentication, runs submitted with ``fedpeft deploy``), one of
them dropping out of a SecAgg+ round after it has shared its keys.

The drop is the ``secagg-drop-after-keys`` fault (:mod:`fedpeft.flower.fault_injection`):
the node answers setup and share-keys, then fails the stage that collects masked
vectors. It fails at once instead of going silent, so no step waits on a timeout.
One node serves both tests with the fault list ``none,secagg-drop-after-keys``: round 1
runs with the whole cohort, round 2 loses that node.

Slow even on the tiny model: Flower runs each message in its own ClientApp process,
and a SecAgg+ round sends four messages to every node where a plain round sends one,
each process importing fedpeft (torch, peft, ...) anew; hence a run timeout well
above the plain tests'.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
import tomllib

from fedpeft.checkpoint import load_checkpoint
from fedpeft.flower.deployment import DEPLOYMENT_MAX_UPDATE_NORM
from fedpeft.flower.local_federation import LocalFederation
from tests.conftest import tiny_config
from tests.flower.test_deployment_e2e import finish, logs, metrics

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 900.0
DROPPER = "dropper"
"""The node that drops out of round 2 after sharing its keys (client 2)."""


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install openssl openssh-client)")
    local = LocalFederation(tmp_path_factory.mktemp("secure-federation"))
    try:
        local.start_superlink()
        local.start_node("node0", 0)
        local.start_node("node1", 1)
        local.start_node(DROPPER, 2, extra=("--fault", "none,secagg-drop-after-keys"))
        yield local
    finally:
        local.close()


def write_config(
    folder: Path, tiny_bert_dir: Path, sentiment_files: dict[str, Path], name: str, **secure
) -> Path:
    """Three clients, two secure rounds on the tiny BERT; no update norm bound set."""
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["train"]["steps"] = 3
    data["federation"].update(
        rounds=2,
        min_train_clients=2,
        min_available_clients=3,
        round_retries=0,
        # Generous: every step here is event-driven (the drop is an immediate error
        # reply), so the timeout is only reached when something is broken.
        round_timeout=180.0,
        secure_aggregation={"enabled": True, **secure},
    )
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def deploy(federation: LocalFederation, config: Path, run: Path) -> tuple[subprocess.Popen, Path]:
    """Submit a run; the process and its log (``logs/deploy-N.log``, see LocalFederation.deploy)."""
    folder = federation.folder / "logs"
    log = folder / f"deploy-{len(list(folder.glob('deploy-*.log')))}.log"
    return federation.deploy("--config", str(config), "--out", str(run)), log


def node_id(federation: LocalFederation, name: str) -> int:
    """The SuperLink's id of node ``name``, from the SuperNode's log."""
    found = re.search(r"SuperNode ID: (\d+)", federation.nodes[name].log.read_text(errors="replace"))
    assert found is not None, logs(federation)
    return int(found.group(1))


def test_a_node_dropped_after_sharing_its_keys_leaves_the_round_to_the_survivors(
    federation: LocalFederation, tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = write_config(federation.folder, tiny_bert_dir, sentiment_files, "secure")
    run = federation.folder / "runs" / "secure"
    process, log = deploy(federation, config, run)
    finish(process, federation, RUN_TIMEOUT)
    assert process.returncode == 0, logs(federation)
    assert (run / "adapter" / "adapter_config.json").is_file(), logs(federation)
    first, second = metrics(run)["rounds"]

    assert first["clients"] == 3 and not first["rejected"], first
    assert (first["aggregation"]["secagg_cohort"], first["aggregation"]["secagg_survivors"]) == (3, 3)

    # Round 2: the dropper's masks were rebuilt from the survivors' shares, and the
    # round is the survivors' alone.
    assert second["clients"] == 2, second
    assert (second["aggregation"]["secagg_cohort"], second["aggregation"]["secagg_survivors"]) == (3, 2)
    assert sorted(c["client_id"] for c in second["per_client"]) == [0, 1]
    (rejected,) = second["rejected"]
    assert rejected["node_id"] == node_id(federation, DROPPER)
    assert "collect_masked_vectors" in rejected["reason"] and "after sharing keys" in rejected["reason"]

    for record in (first, second):
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
        assert sum(c["bytes_up"] for c in record["per_client"]) == record["bytes_up"]
    # The dropper was sent setup, share-keys and the training stage (the adapter):
    # counted, so round 2 sent nearly what round 1 did (2/3 of it without the dropper).
    assert second["bytes_down"] > 0.9 * first["bytes_down"]

    # The deployment default bound travelled to the clients, who clip themselves.
    sent = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    assert sent["federation"]["max_update_norm"] == DEPLOYMENT_MAX_UPDATE_NORM
    assert "each client clips its own update" in log.read_text(errors="replace")


def test_too_few_survivors_stop_the_run_and_keep_the_last_completed_round(
    federation: LocalFederation, tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    # Every share is needed: one dropout leaves the masks impossible to remove.
    config = write_config(
        federation.folder, tiny_bert_dir, sentiment_files, "too-few", reconstruction_threshold=1.0
    )
    run = federation.folder / "runs" / "too-few"
    process, log = deploy(federation, config, run)
    finish(process, federation, RUN_TIMEOUT)
    # fedpeft deploy fails, and its last line says why: the ServerApp's FederationError.
    assert process.returncode == 1, logs(federation)
    said = log.read_text(errors="replace")
    assert "FederationError" in said, said[-3000:]
    (verdict,) = [line for line in said.splitlines() if line.startswith("fedpeft deploy: run ")]
    assert "finished:failed" in verdict and "round 2" in verdict
    assert "secure aggregation halted" in verdict and "reconstruction_threshold" in verdict
    checkpoint = load_checkpoint(run)
    assert checkpoint is not None and checkpoint.completed_round == 1 and not checkpoint.finished
    assert [r["round"] for r in metrics(run)["rounds"]] == [1]
    assert not (run / "adapter").exists()
