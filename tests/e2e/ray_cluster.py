"""A real two-node Ray cluster on this machine: `ray start --head` and a second raylet joining it, each labelled."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Every node offers one `ibllm_slot`: work that asks for one lands on a node of its own. `ibllm_node_<name>` pins.
SLOT = "ibllm_slot"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One `ray start --block` process (the node's raylet and workers are its children)."""

    name: str
    proc: subprocess.Popen
    log: Path

    def raylet(self) -> psutil.Process:
        """The node's raylet process."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "raylet" or "raylet" in " ".join(child.cmdline()[:1]):
                    return child
        raise RuntimeError(f"node {self.name}: no raylet among the children of pid {self.proc.pid}")


@dataclass
class Cluster:
    """The address drivers connect to, and the nodes by name."""

    address: str
    temp_dir: str
    cpus: int
    nodes: dict[str, Node] = field(default_factory=dict)

    def join(self, name: str) -> Node:
        """Start a node `name` that joins the cluster (with the labels `SLOT` and `ibllm_node_<name>`)."""
        if name in self.nodes:  # a node of that name that lost its raylet: what is left of it goes first
            _stop(self.nodes[name])
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.nodes[name] = _start(name, ["--address", self.address], self.temp_dir, self.cpus, env)
        return self.nodes[name]


def _ray(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), *args]


def _start(name: str, args: list[str], temp_dir: str, cpus: int, env: dict[str, str]) -> Node:
    log = Path(temp_dir) / f"start-{name}.log"
    resources = f'{{"{SLOT}": 1, "ibllm_node_{name}": 1}}'
    cmd = _ray(
        "start",
        "--block",
        *args,
        "--num-cpus",
        str(cpus),
        "--resources",
        resources,
        "--object-store-memory",
        str(256 * 2**20),
        "--node-ip-address",
        "127.0.0.1",
        "--disable-usage-stats",
    )
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Node(name, proc, log)


def _wait_for_port(address: str, node: Node, timeout: float = 60) -> None:
    """Until the head's GCS accepts connections."""
    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if node.proc.poll() is not None:
            raise RuntimeError(f"ray start for node {node.name} exited:\n{node.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head at {address} did not listen within {timeout} s")


def wait_for_nodes(cluster: Cluster, count: int, timeout: float = 120) -> None:
    """Until this driver (connected) sees `count` live nodes."""
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        for node in cluster.nodes.values():
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start for node {node.name} exited:\n{node.log.read_text()[-3000:]}")
        if sum(n["Alive"] for n in ray.nodes()) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray cluster at {cluster.address} did not reach {count} live nodes in {timeout} s")


@contextlib.contextmanager
def two_nodes(cpus: int = 2) -> Iterator[Cluster]:
    """A head node `a` and a worker node `b`, each with `cpus` logical CPUs and its own labels; stopped on exit.
    Node `b` may still be joining when this yields: a driver connects, then `wait_for_nodes(cluster, 2)`.

    The session folder stays, as Ray's own do: a driver process keeps writing some logs where its first session
    was (Ray Data's `ray-data.log`), and later local Ray instances of the same test process would fail on a removed
    folder."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    cluster = Cluster(address, temp_dir, cpus)
    try:
        head = [
            "--head",
            "--port",
            str(port),
            "--temp-dir",
            temp_dir,
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(free_port()),
            "--ray-client-server-port",
            str(free_port()),
        ]
        cluster.nodes["a"] = _start("a", head, temp_dir, cpus, env)
        _wait_for_port(address, cluster.nodes["a"])
        cluster.join("b")
        yield cluster
    finally:
        for node in reversed(list(cluster.nodes.values())):
            _stop(node)


def _stop(node: Node) -> None:
    """Stop the node: its `ray start --block` process and every process it started (GCS, raylet, workers), which
    Ray does not all keep in one process group."""
    try:
        procs = [psutil.Process(node.proc.pid), *psutil.Process(node.proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=5)
        if not procs:
            break
    node.proc.wait(timeout=10)
