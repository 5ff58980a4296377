"""A ring of real member processes on loopback (``python -m
storage.ringnode``), for process tests, benchmarks and local demos.

The harness creates the owner's and members' keys, picks free loopback
ports, writes the owner-signed descriptor to ``ring.json``, and starts,
pauses (SIGSTOP: alive but silent), kills (SIGKILL) and restarts members by
PID. Every process it started is stopped by :meth:`LocalRing.close`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from overlay.lifeline import Lifeline
from overlay.wire.ids import Identity

from .certificate import RingDescriptor


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MemberFailed(Exception):
    """A member process exited or did not report ready in time."""


class LocalRing:
    def __init__(self, directory, *, f: int = 1, args: list[str] | None = None,
                 byzantine: dict[int, str] | None = None, name: str = "local",
                 owner: Identity | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args or []
        self.byzantine = byzantine or {}
        self.owner = owner or Identity.generate()   # e.g. the volume's owner
        n = 3 * f + 1
        self.ids = []
        for k in range(n):
            ident = Identity.generate()
            ident.save(self.dir / f"member{k}" / "node.key")
            self.ids.append(ident)
        ports = free_ports(n)
        self.ring = RingDescriptor.create(self.owner, name, [
            (i.public_key, f"127.0.0.1:{p}") for i, p in zip(self.ids, ports)], f=f)
        self.ring_file = self.dir / "ring.json"
        self.ring_file.write_text(self.ring.to_json())
        self.procs: list[subprocess.Popen | None] = [None] * n
        self._lifeline = Lifeline()    # members stop if this process dies unannounced
        self.ready: list[dict | None] = [None] * n

    def command(self, k: int) -> list[str]:
        cmd = [sys.executable, "-m", "storage.ringnode", "--data", str(self.dir / f"member{k}"),
               "--ring", str(self.ring_file)] + self.args
        if k in self.byzantine:
            cmd += ["--byzantine", self.byzantine[k]]
        return cmd

    async def start(self, timeout: float = 30.0) -> None:
        for k in range(len(self.ids)):
            self.spawn(k)
        async with trio.open_nursery() as n:
            for k in range(len(self.ids)):
                n.start_soon(self.wait_ready, k, timeout)

    def spawn(self, k: int, extra: list[str] | None = None) -> None:
        if self.procs[k] is not None and self.procs[k].poll() is None:
            raise RuntimeError(f"member {k} is running")
        log = open(self.dir / f"member{k}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        self.procs[k] = subprocess.Popen(self.command(k) + (extra or []), stdout=subprocess.PIPE,
                                         stderr=log, env=self._lifeline.env(env),
                                         pass_fds=self._lifeline.pass_fds,
                                         start_new_session=True)
        log.close()
        self.ready[k] = None

    async def wait_ready(self, k: int, timeout: float = 30.0) -> dict:
        p = self.procs[k]
        with trio.move_on_after(timeout):
            line = await trio.to_thread.run_sync(p.stdout.readline, abandon_on_cancel=True)
            if line:
                self.ready[k] = json.loads(line)
                return self.ready[k]
        tail = (self.dir / f"member{k}.log").read_text(errors="replace")[-2000:]
        raise MemberFailed(f"member {k} (pid {p.pid}) not ready (exit {p.poll()}): {tail}")

    async def restart(self, k: int, timeout: float = 30.0) -> dict:
        self.spawn(k)
        return await self.wait_ready(k, timeout)

    def pid(self, k: int) -> int:
        return self.procs[k].pid

    def pause(self, k: int) -> None:
        os.kill(self.pid(k), signal.SIGSTOP)

    def resume(self, k: int) -> None:
        os.kill(self.pid(k), signal.SIGCONT)

    def kill(self, k: int) -> None:
        p = self.procs[k]
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            p.stdout.close()

    def stop(self, k: int, timeout: float = 10.0) -> int | None:
        p = self.procs[k]
        if p is None:
            return None
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p.stdout:
            p.stdout.close()
        return p.returncode

    def close(self) -> None:
        for k in range(len(self.procs)):
            self.stop(k)
