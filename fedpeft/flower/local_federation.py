"""A real deployment on one machine: a SuperLink and SuperNodes as separate processes.

For trials, the end-to-end tests and ``benchmarks/deploy.py``. Everything is started
through the repository's own ``server/`` and ``clients/`` scripts, so what runs here is
what an operator runs: TLS with certificates from ``server/make_certificates.sh``, the
SuperLink on its Control port with the Fleet gateway on the public port, SuperNode keys
registered with the SuperLink, runs submitted with ``fedpeft deploy``.
Each process gets its own session, so it (and every process it started) can be
killed at once, the way a machine losing power would take them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.flower.deployment import app_folder

CONNECTION = "local"
"""The SuperLink connection name this federation writes into its Flower home."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Node:
    """One SuperNode process."""

    name: str
    partition_id: int
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalFederation:
    """A SuperLink with TLS and node authentication, and SuperNodes, on 127.0.0.1.

    Args:
        folder: Holds certs/ (ca-private/ beside it), keys/, the SuperLink's state/,
            logs/ and a Flower home.
        port: The public port: the Fleet gateway SuperNodes dial (default: a free one).
        control_port: The SuperLink's own port: Control API for ``flwr`` and the
            ``local`` connection, Runtime API (default: a free one).

    """

    folder: Path
    port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    superlink: subprocess.Popen[bytes] | None = None
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = self.folder.resolve()  # the processes run in it
        while self.control_port == self.port:
            self.control_port = free_port()
        self.root = app_folder()
        for sub in ("logs", "keys", "flwr-home"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHON": sys.executable,
            "FLWR_HOME": str(self.folder / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        }
        self.certs = self.folder / "certs"
        if not (self.certs / "server.crt").is_file():
            self._script("server/make_certificates.sh", str(self.certs))

    @property
    def address(self) -> str:
        """The public (Fleet gateway) address SuperNodes dial."""
        return f"127.0.0.1:{self.port}"

    @property
    def control_address(self) -> str:
        """The SuperLink's own address, the operator's: Control API (``flwr``)."""
        return f"127.0.0.1:{self.control_port}"

    def _script(self, script: str, *args: str) -> str:
        done = subprocess.run(
            ["bash", str(self.root / script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def _spawn(
        self, log_name: str, command: list[str], cwd: Path | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.folder / "logs" / log_name
        with log.open("ab") as out:
            process = subprocess.Popen(
                command,
                cwd=cwd or self.folder,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return process, log

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and its gateway (keeping the state) and wait until both answer."""
        log = self.folder / "logs" / "superlink.log"
        seen = log.stat().st_size if log.exists() else 0  # a restart appends to the log
        self.superlink, log = self._spawn(
            "superlink.log",
            [
                "bash",
                str(self.root / "server/start_superlink.sh"),
                "--certs",
                str(self.certs),
                "--state",
                str(self.folder / "state"),
                "--port",
                str(self.port),
                "--control-port",
                str(self.control_port),
            ],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_bytes()[seen:].decode(errors="replace")
            if self.superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited at start:\n{text}")
            if "Application startup complete" in text and _listening(self.port):
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"the SuperLink and its gateway did not start in {timeout:g} s (see {log})")
        self._script("server/connect.sh", CONNECTION, self.control_address, str(self.certs / "ca.crt"))

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink, its gateway and what they started (the ServerApp too)."""
        if self.superlink is not None:
            _kill_group(self.superlink)
            self.superlink = None

    def new_key(self, name: str) -> Path:
        """A fresh SuperNode key pair ``keys/<name>`` (+ ``.pub``)."""
        key = self.folder / "keys" / name
        if not key.exists():
            self._script("clients/make_node_key.sh", str(key))
        return key

    def register(self, name: str) -> None:
        """Register the public key of node ``name`` with the SuperLink."""
        self._script("server/register_supernodes.sh", CONNECTION, str(self.new_key(name)) + ".pub")

    def start_node(
        self,
        name: str,
        partition_id: int,
        *,
        register: bool = True,
        superlink_address: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> Node:
        """Start SuperNode ``name`` (registering its key first unless told not to).

        Args:
            name: Names the node's key and log.
            partition_id: The client's id (and partition, without ``--data-file``).
            register: Register the key first; False makes an intruder.
            superlink_address: Dial this instead of the SuperLink (a proxy in between).
            extra: More ``clients/start_supernode.sh`` arguments (``--fault``, ...).

        """
        key = self.new_key(name)
        if register:
            self.register(name)
        process, log = self._spawn(
            f"{name}.log",
            [
                "bash",
                str(self.root / "clients/start_supernode.sh"),
                "--superlink",
                superlink_address or self.address,
                "--ca",
                str(self.certs / "ca.crt"),
                "--key",
                str(key),
                "--partition-id",
                str(partition_id),
                "--port",
                str(free_port()),
                *extra,
            ],
        )
        node = Node(name, partition_id, process, log)
        self.nodes[name] = node
        return node

    def kill_node(self, name: str) -> None:
        """SIGKILL node ``name`` and its ClientApp processes."""
        _kill_group(self.nodes.pop(name).process)

    def deploy(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``fedpeft deploy --superlink local ARGS``; its log goes to logs/deploy-N.log."""
        runs = len(list((self.folder / "logs").glob("deploy-*.log")))
        process, _ = self._spawn(
            f"deploy-{runs}.log",
            [sys.executable, "-m", "fedpeft.cli", "deploy", "--superlink", CONNECTION, *args],
            cwd=Path.cwd(),  # relative paths in ARGS mean what they meant to the caller
        )
        return process

    def close(self) -> None:
        """Kill every process this federation started."""
        for name in list(self.nodes):
            self.kill_node(name)
        self.kill_superlink()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
