"""Real overlay node processes (``python -m overlay``) on 127.0.0.1 over the
TLS transport, driven through their control sockets: join, route, publish,
locate, graceful leave, and kill -9 with objects still found from their other
replicas. Every process is stopped by PID and its directory removed."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from overlay import control
from overlay.messages import salted
from overlay.routing_table import global_root

ROOT = Path(__file__).resolve().parent.parent
# Test-scale timers: failures are noticed within a few seconds.
TIMERS = ["--heartbeat", "1", "--dead-after", "3", "--republish", "2", "--pointer-ttl", "6",
          "--repair", "2", "--hop-timeout", "1"]


class Proc:
    def __init__(self, popen: subprocess.Popen, data: Path, info: dict):
        self.popen = popen
        self.pid = popen.pid
        self.data = data
        self.id = bytes.fromhex(info["id"])
        self.addr = info["addr"]
        self.bootstrap = info["bootstrap"]
        self.ctl = info["control"]

    async def call(self, msg_type: str, body: dict | None = None) -> dict:
        return await control.call(self.ctl, msg_type, body or {}, timeout=20)


class Cluster:
    """Node processes started one after the other, each joining through one
    or two of the earlier ones. Starting is synchronous (no trio needed), so
    one cluster serves the whole module: Python start-up is the slow part."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: list[Proc] = []     # alive
        self.all: list[subprocess.Popen] = []

    def start(self, bootstrap: list[Proc] = ()) -> Proc:
        i = len(self.all)
        data = self.base / f"n{i}"
        args = [sys.executable, "-m", "overlay", "--listen", "127.0.0.1:0", "--data", str(data),
                *TIMERS]
        for b in bootstrap:
            args += ["--bootstrap", b.bootstrap]
        log = self.base / f"n{i}.log"
        with open(log, "wb") as err:
            popen = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        self.all.append(popen)
        ready, _, _ = select.select([popen.stdout], [], [], 60)
        line = popen.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"node {i} not ready:\n{log.read_text()}")
        info = json.loads(line)
        assert info["event"] == "ready"
        p = Proc(popen, data, info)
        self.procs.append(p)
        return p

    def grow(self, n: int, rnd: random.Random) -> None:
        for _ in range(n):
            self.start(rnd.sample(self.procs, min(2, len(self.procs))))

    def kill9(self, p: Proc) -> None:
        os.kill(p.pid, signal.SIGKILL)
        p.popen.wait(timeout=10)
        self.procs.remove(p)

    async def leave(self, p: Proc) -> None:
        await p.call("tap.ctl.leave")
        rc = await trio.to_thread.run_sync(lambda: p.popen.wait(timeout=20))
        assert rc == 0
        self.procs.remove(p)

    def ids(self) -> list[bytes]:
        return sorted(p.id for p in self.procs)

    def stop_all(self) -> None:
        for popen in self.all:
            if popen.poll() is None:
                os.kill(popen.pid, signal.SIGKILL)
        for popen in self.all:
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if popen.stdout:
                popen.stdout.close()


@pytest.fixture(scope="module")
def cluster():
    """Eleven nodes: the first test has two leave, the second kills three."""
    base = Path(tempfile.mkdtemp(prefix="tap-"))
    c = Cluster(base)
    try:
        c.start()
        c.grow(10, random.Random(1))
        yield c
    finally:
        c.stop_all()
        shutil.rmtree(base, ignore_errors=True)


async def eventually(check, timeout: float = 30.0, every: float = 0.5):
    """Poll an async check until it passes (AssertionError = not yet)."""
    with trio.move_on_after(timeout):
        while True:
            try:
                return await check()
            except AssertionError:
                await trio.sleep(every)
    return await check()   # one last time, letting its assertion speak


async def roots_agree(c: Cluster, guids) -> None:
    ids = c.ids()
    for g in guids:
        expected = global_root(g, ids)
        for p in c.procs:
            r = await p.call("tap.ctl.route", {"guid": g})
            assert r["root"]["id"] == expected, f"{p.id[:4].hex()} routes {g[:4].hex()} wrongly"


async def located(p: Proc, g: bytes, n: int = 3) -> set[bytes]:
    r = await p.call("tap.ctl.locate", {"guid": g, "n": n})
    return {h["id"] for h in r["holders"]}


async def test_join_route_publish_locate_leave(cluster):
    rnd = random.Random(1)
    c = cluster
    first = c.procs[0]
    assert len(c.procs) >= 9
    for p in c.procs:
        st = (await p.call("tap.ctl.status"))["status"]
        assert st["joined"] and st["neighbours"] >= 1
    table = (await first.call("tap.ctl.table"))["table"]
    assert table["id"] == first.id.hex() and table["rows"]

    guids = [rnd.randbytes(32) for _ in range(6)]
    await roots_agree(c, guids)

    g = rnd.randbytes(32)
    a, b = c.procs[2], c.procs[5]
    r = await a.call("tap.ctl.publish", {"guid": g})
    assert {x["id"] for x in r["roots"]} == {global_root(salted(g, i), c.ids()) for i in range(3)}
    await b.call("tap.ctl.publish", {"guid": g})
    for p in c.procs:
        assert await located(p, g) == {a.id, b.id}

    # Graceful leave of a root of the object: no one lists it any more, roots
    # agree on the remaining nodes, the object is still found at once.
    root1 = global_root(salted(g, 1), c.ids())
    leaver = next(p for p in c.procs if p.id == root1) if root1 not in (a.id, b.id) else c.procs[7]
    await trio.sleep(1.5)   # one heartbeat: every node that lists it has a backpointer there
    await c.leave(leaver)
    for p in c.procs:
        t = (await p.call("tap.ctl.table"))["table"]
        listed = {e["id"] for row in t["rows"] for slot in row["slots"].values() for e in slot}
        assert leaver.id.hex() not in listed
    await roots_agree(c, guids + [g])
    for p in c.procs:
        assert await located(p, g) == {a.id, b.id}

    # A holder leaves: it withdraws its copy.
    await c.leave(a)
    for p in c.procs:
        assert await located(p, g) == {b.id}


async def test_kill9_objects_still_found_from_other_replicas(cluster):
    rnd = random.Random(2)
    c = cluster
    assert len(c.procs) >= 8
    objs = {}
    for _ in range(6):
        g = rnd.randbytes(32)
        objs[g] = rnd.sample(c.procs, 3)
        for h in objs[g]:
            await h.call("tap.ctl.publish", {"guid": g})
    # Kill three nodes, holders among them, without warning.
    victims = rnd.sample(c.procs, 3)
    for v in victims:
        c.kill9(v)
    dead = {v.id for v in victims}
    assert any(h.id in dead for hs in objs.values() for h in hs)

    async def all_found():
        for g, holders in objs.items():
            alive = {h.id for h in holders if h.id not in dead}
            for p in c.procs:
                assert await located(p, g) == alive
    # Already right before any repair: locate skips holders that do not answer.
    await all_found()

    # After failure detection and repair, no table lists a dead node and
    # routing agrees on the survivors.
    guids = [rnd.randbytes(32) for _ in range(4)]

    async def repaired():
        for p in c.procs:
            t = (await p.call("tap.ctl.table"))["table"]
            listed = {e["id"] for row in t["rows"] for slot in row["slots"].values() for e in slot}
            assert not listed & {d.hex() for d in dead}
        await roots_agree(c, guids)

    await eventually(repaired)
    await all_found()
