"""An embedded local network: node processes on loopback, started and stopped
as one unit (``p2pfs demo``, benchmarks, and multi-process tests).

Each node is a real OS process with its own data directory under the
cluster's base directory. A node announces itself by printing one JSON line
``{"event": "ready", "id": <hex NodeID>, "addr": "host:port", ...}`` on
stdout; everything else it prints goes to ``<data>/node.log``. The first node
starts alone; the others join through it.

Stopping is by PID only: SIGTERM (a node leaves the overlay gracefully on
it), then SIGKILL after a grace period. The supervisor never looks processes
up by name. Should this process die without stopping them (kill -9), the
nodes see their lifeline cut and stop themselves (``overlay.lifeline``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from overlay.lifeline import Lifeline

log = logging.getLogger(__name__)


class ClusterError(Exception):
    """A node process failed to start or announce itself in time."""


@dataclass
class NodeProcess:
    index: int
    data_dir: Path
    proc: subprocess.Popen
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def id_hex(self) -> str:
        return self.info["id"]

    @property
    def addr(self) -> str:
        return self.info["addr"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


# argv_for(index, data_dir, bootstrap_nodes) -> the command line of node ``index``
ArgvFactory = Callable[[int, Path, Sequence[NodeProcess]], list[str]]


class LocalCluster:
    """Start, watch and stop a set of node processes on loopback."""

    def __init__(self, base_dir: Path, argv_for: ArgvFactory, *, ready_timeout: float = 30.0,
                 env: dict | None = None):
        self.base_dir = Path(base_dir)
        self.argv_for = argv_for
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, **(env or {})}
        self.nodes: list[NodeProcess] = []
        self.lifeline = Lifeline()     # nodes stop if this process dies unannounced

    def start_node(self, index: int, bootstrap: Sequence[NodeProcess] = ()) -> NodeProcess:
        data = self.base_dir / f"node{index}"
        data.mkdir(parents=True, exist_ok=True)
        logf = open(data / "node.log", "ab")
        try:
            proc = subprocess.Popen(
                self.argv_for(index, data, bootstrap),
                stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                env=self.lifeline.env(self.env), pass_fds=self.lifeline.pass_fds,
                start_new_session=True,
            )
        finally:
            logf.close()
        node = NodeProcess(index, data, proc)
        self.nodes.append(node)
        node.info = self._await_ready(node)
        return node

    def _await_ready(self, node: NodeProcess) -> dict:
        deadline = time.monotonic() + self.ready_timeout
        assert node.proc.stdout is not None
        os.set_blocking(node.proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise ClusterError(
                    f"node {node.index} exited with code {node.proc.returncode} before it was ready; "
                    f"see {node.data_dir / 'node.log'}"
                )
            chunk = node.proc.stdout.read(65536)
            if chunk:
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("event") == "ready":
                        return msg
            else:
                time.sleep(0.02)
        raise ClusterError(f"node {node.index} did not become ready within {self.ready_timeout:.0f} s; "
                           f"see {node.data_dir / 'node.log'}")

    def start(self, n: int) -> list[NodeProcess]:
        """Start ``n`` nodes: the first alone, the rest joining through it."""
        try:
            first = self.start_node(0)
            for i in range(1, n):
                self.start_node(i, [first])
        except BaseException:
            self.stop()
            raise
        return self.nodes

    def kill(self, node: NodeProcess) -> None:
        """kill -9 one node (fault injection)."""
        if node.alive:
            node.proc.kill()
        node.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        """Stop every node: SIGTERM, then SIGKILL for those still alive."""
        for node in self.nodes:
            if node.alive:
                try:
                    node.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for node in self.nodes:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                node.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                log.warning("node %d (pid %d) ignored SIGTERM; killing it", node.index, node.pid)
                node.proc.kill()
                node.proc.wait()
            if node.proc.stdout is not None:
                node.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def python_module_argv(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def storage_argv(*extra: str):
    """An ``argv_for`` for :class:`LocalCluster`: ``python -m storage`` on
    127.0.0.1 (any port) with ``extra`` options, joining through the nodes
    started before it."""

    def argv_for(index: int, data: Path, bootstrap) -> list[str]:
        args = ["--data", str(data), "--listen", "127.0.0.1:0", *extra]
        for b in bootstrap:
            args += ["--bootstrap", b.info["bootstrap"]]
        return python_module_argv("storage", *args)

    return argv_for
