"""Who may reach the SuperLink: an outsider holding ca.crt, on the public (Fleet)
address, can neither register a SuperNode key nor start a run; the operator, on the
Control address (loopback), can. Real processes: the SuperLink and its Fleet gateway
started by server/start_superlink.sh, and Flower's own ``flwr`` command line.

No training: a one-file Flower app is enough to submit a run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fedpeft.flower.local_federation import LocalFederation, _kill_group, free_port

pytestmark = pytest.mark.slow

FLWR = str(Path(sys.executable).parent / "flwr")
PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install openssl openssh-client)")
    local = LocalFederation(tmp_path_factory.mktemp("access"))
    try:
        local.start_superlink()
        yield local
    finally:
        local.close()


@pytest.fixture(scope="module")
def probe_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest Flower app ``flwr run`` accepts."""
    app = tmp_path_factory.mktemp("probe")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "probe"\nversion = "0.1.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "probe:app"\nclientapp = "probe:app"\n\n'
        "[tool.flwr.app.config]\n",
        encoding="utf-8",
    )
    (app / "probe.py").write_text("app = None\n", encoding="utf-8")
    return app


def flwr_home(federation: LocalFederation, who: str, address: str) -> dict[str, str]:
    """An environment whose Flower home names ``address`` as connection ``who``, with ca.crt only."""
    home = federation.folder / f"{who}-home"
    home.mkdir(exist_ok=True)
    env = {**federation.env, "FLWR_HOME": str(home)}
    connect = federation.root / "server/connect.sh"
    subprocess.run(
        ["bash", str(connect), who, address, str(federation.certs / "ca.crt")], env=env, check=True
    )
    return env


def flwr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLWR, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def listed(env: dict[str, str], what: str, connection: str) -> list[dict]:
    """``flwr supernode list`` or ``flwr ls`` as JSON, which must succeed."""
    args = ("supernode", "list") if what == "nodes" else ("ls",)
    done = flwr(env, *args, connection, "--format", "json")
    answer = json.loads(done.stdout)
    assert answer["success"], done.stdout
    return answer[what]


def test_flower_alone_lets_anyone_with_the_ca_certificate_register_a_key(
    federation: LocalFederation,
) -> None:
    # Why the gateway exists: a bare Flower 1.41 SuperLink, exposed as this repository's
    # scripts used to expose it, serves its Control API to any TLS client.
    port = free_port()
    process, log = federation._spawn(
        "bare-superlink.log",
        [
            "flower-superlink",
            *("--ssl-ca-certfile", str(federation.certs / "ca.crt")),
            *("--ssl-certfile", str(federation.certs / "server.crt")),
            *("--ssl-keyfile", str(federation.certs / "server.key")),
            "--enable-supernode-auth",
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
    )
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.3)
        outsider = flwr_home(federation, "bare-outsider", f"127.0.0.1:{port}")
        key = federation.new_key("bare-outsider")
        done = flwr(outsider, "supernode", "register", f"{key}.pub", "bare-outsider")
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr
    finally:
        _kill_group(process)


def test_an_outsider_on_the_public_address_cannot_register_a_key_or_start_a_run(
    federation: LocalFederation, probe_app: Path
) -> None:
    outsider = flwr_home(federation, "outsider", federation.address)
    key = federation.new_key("outsider")
    register = flwr(outsider, "supernode", "register", f"{key}.pub", "outsider")
    assert register.returncode != 0 and "403 Forbidden" in register.stderr, register.stdout + register.stderr
    run = flwr(outsider, "run", str(probe_app), "outsider")
    assert run.returncode != 0 and "403 Forbidden" in run.stderr, run.stdout + run.stderr

    ca = str(federation.certs / "ca.crt")
    with httpx.Client(base_url=f"https://{federation.address}", verify=ca, timeout=30) as client:
        # The ServerApp's Runtime API: acquire-task would hand out a pending ServerApp task.
        assert client.post("/v1/runtime/acquire-task", content=b"", headers=PROTOBUF).status_code == 403

    # Fleet self-registration, signed with the outsider's own key as a SuperNode signs:
    # it passes the gateway, and the SuperLink (node authentication on) refuses it.
    private_key = load_ssh_private_key(key.read_bytes(), password=None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    public_key = private_key.public_key()
    signer = NodeAuthHttpInterceptor(private_key, public_key)
    with FleetHttpClient.from_server_address(federation.address, False, ca, [signer]) as fleet:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            fleet.RegisterNode(RegisterNodeFleetRequest(public_key=public_key_to_bytes(public_key)))
    assert "must be registered via the CLI" in refused.value.response.text, refused.value.response.text

    operator = federation.env
    assert listed(operator, "nodes", "local") == []
    assert listed(operator, "runs", "local") == []
    gateway_log = (federation.folder / "logs" / "superlink.log").read_text(errors="replace")
    assert "refused POST '/v1/control/register-node'" in gateway_log


def test_the_operator_on_the_control_address_registers_keys_and_starts_runs(
    federation: LocalFederation, probe_app: Path
) -> None:
    operator = federation.env
    federation.register("device")
    assert len(listed(operator, "nodes", "local")) == 1
    run = flwr(operator, "run", str(probe_app), "local")
    assert run.returncode == 0 and "Successfully started run" in run.stdout, run.stdout + run.stderr
    assert [r["fab-id"] for r in listed(operator, "runs", "local")] == ["outsider/probe"]
