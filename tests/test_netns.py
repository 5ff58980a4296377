"""Replicated blocks on five storage node processes, each in a network
namespace of its own (``tests/netns.py``), under real link faults: a cut
cable and a 2 | 3 partition, each healed (issue 10; DESIGN.md "What must
always hold": nothing acknowledged is lost to the failure of r-1 holders,
block bytes are checked against their BGUID).

The nodes are ``python -m storage`` processes started by
``p2pfs.cluster.LocalCluster`` through ``ip netns exec``; blocks are put and
read through their unix control sockets (``blk.ctl.put`` / ``blk.ctl.get``,
so sealing, placement, replication and verified reads all run in the nodes),
and who holds what is asked over TLS from a sixth, client-only namespace
(``blk.fetch``, every copy verified against its BGUID). Tests run in file
order on one module-wide network and each ends with a full data check:
every block acknowledged so far reads back byte-identical through every
node that should serve it.

Without namespaces (not root, no iproute2) the first test runs on loopback
addresses and the fault tests skip, saying so ("loopback-only fallback").
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import pytest
import trio

from overlay import control
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer, PeerError
from p2pfs.cluster import LocalCluster, NodeProcess, python_module_argv
from storage import blockservice as bs
from storage.blockapi import Kind
from storage.errors import StorageError
from storage.server import CTL_PUT  # noqa: F401  (registers the blk.ctl.* messages)

from netns import Host, Lab, open_lab

KEY = bytes(range(32))
DATA = int(Kind.DATA)
NODES = 5
R = 3
# Test-scale overlay timers: a silent neighbour is dropped after 3 s, so
# routes heal within seconds of a fault (defaults are 10 s / 30 s).
TIMERS = ["--heartbeat", "1", "--dead-after", "3", "--repair", "2", "--hop-timeout", "1"]


def _node_argv(host: Host, data, bootstrap: list[NodeProcess]) -> list[str]:
    args = ["--data", str(data), "--listen", host.listen(), "--quota", "16M",
            "--repair-interval", "5", "--log-level", "info", *TIMERS]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


def block(tag: bytes, size: int = 4000) -> bytes:
    return tag + random.Random(tag).randbytes(size)


@dataclass
class Net:
    """The lab, its node processes, and every block acknowledged so far."""

    lab: Lab
    cluster: LocalCluster
    hosts: list[Host]
    client: Host
    written: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def nodes(self) -> list[NodeProcess]:
        return self.cluster.nodes

    def node(self, host: Host) -> NodeProcess:
        return self.nodes[self.hosts.index(host)]

    def peer(self, host: Host) -> Peer:
        n = self.node(host)
        return Peer(bytes.fromhex(n.id_hex), n.addr)

    async def ctl(self, host: Host, msg_type: str, body: dict | None = None,
                  timeout: float = 60) -> dict:
        # The control socket is a file: reachable from here whatever the
        # state of the host's network.
        return await control.call(self.node(host).info["control"], msg_type, body or {},
                                  timeout=timeout)

    async def put(self, host: Host, data: bytes) -> dict:
        r = await self.ctl(host, "blk.ctl.put", {"key": KEY, "kind": DATA, "data": data, "r": R})
        self.written[r["bguid"]] = data      # acknowledged: must never be lost
        return r

    async def get(self, host: Host, g: bytes) -> bytes:
        r = await self.ctl(host, "blk.ctl.get", {"key": KEY, "kind": DATA, "bguid": g})
        return r["data"]

    async def holders(self, hosts: list[Host] | None = None) -> dict[bytes, set[int]]:
        """For every block written: the hosts (indexes) that serve a copy
        which verifies against its BGUID, asked from the client namespace."""
        hosts = self.hosts if hosts is None else hosts
        peers = [(h.index, self.peer(h)) for h in hosts]
        return await trio.to_thread.run_sync(self.lab.run_in, self.client, _verified_holders,
                                             peers, list(self.written))

    async def full_check(self, hosts: list[Host] | None = None) -> None:
        """Every acknowledged block reads back byte-identical through every
        host given (default: all)."""
        for h in self.hosts if hosts is None else hosts:
            for g, data in self.written.items():
                assert await self.get(h, g) == data, f"{h.name} read a wrong {g.hex()[:12]}"

    async def neighbours(self, host: Host) -> set[int]:
        """Indexes of the hosts in ``host``'s routing table, not suspected."""
        t = (await self.ctl(host, "tap.ctl.table"))["table"]
        ids = {self.node(h).id_hex: h.index for h in self.hosts}
        return {ids[e["id"]] for row in t["rows"] for slot in row["slots"].values()
                for e in slot if not e["suspect"] and e["id"] in ids}

    async def settled(self, *groups: list[Host], deadline: float = 40) -> float:
        """Wait until every host lists exactly the other hosts of its group
        as live neighbours (the overlay noticed the fault or its repair);
        returns the seconds it took."""
        start = time.monotonic()
        while True:
            views = {h.name: (await self.neighbours(h), {g.index for g in grp if g is not h})
                     for grp in groups for h in grp}
            if all(have == want for have, want in views.values()):
                return time.monotonic() - start
            assert time.monotonic() - start < deadline, f"overlay did not settle: {views}"
            await trio.sleep(0.5)

    async def repaired(self, hosts: list[Host], deadline: float = 45) -> dict[bytes, set[int]]:
        """Run repair passes on ``hosts`` until every block has r verified
        copies among them; returns the holders."""
        end = time.monotonic() + deadline
        while True:
            held = await self.holders(hosts)
            short = {g: h for g, h in held.items() if len(h) < R}
            if not short:
                return held
            assert time.monotonic() < end, f"repair left {len(short)} blocks short: {short}"
            for h in hosts:
                await self.ctl(h, "blk.ctl.repair")
            await trio.sleep(1)


async def _verified_holders(peers: list[tuple[int, Peer]],
                            guids: list[bytes]) -> dict[bytes, set[int]]:
    """Runs inside the client namespace: fetch every block from every peer
    (``get_from`` verifies each copy against its BGUID)."""
    out: dict[bytes, set[int]] = {g: set() for g in guids}
    async with TlsTransport(Identity.generate(), listen=("127.0.0.1", 0)) as t:
        for index, p in peers:
            try:
                got = await bs.get_from(t, p, guids, timeout=5)
            except (PeerError, StorageError):
                continue      # unreachable or refusing: it serves nothing
            for g in got:
                out[g].add(index)
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    base = tmp_path_factory.mktemp("netns")
    lab = open_lab()
    try:
        hosts = [lab.add_host(f"n{i}") for i in range(NODES)]
        client = lab.add_host("client")
        cluster = LocalCluster(
            base, lambda i, data, boot: lab.argv(hosts[i], _node_argv(hosts[i], data, boot)),
            ready_timeout=60)
        try:
            cluster.start(NODES)
            yield Net(lab, cluster, hosts, client)
        finally:
            cluster.stop()
    finally:
        lab.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def faulty(net):
    """The network, for tests that cut links (skipped, with the reason, in
    the loopback-only fallback)."""
    net.lab.require_faults()
    return net


# ---------------------------------------------------------------------------


async def test_blocks_put_with_r3_are_held_three_times_and_readable_everywhere(net):
    if net.lab.faults:
        # Really apart: the nodes' addresses are not this namespace's.
        assert all(not n.addr.startswith("127.") for n in net.nodes)
    for i in range(6):
        r = await net.put(net.hosts[i % NODES], block(b"first-%d" % i))
        assert len(set(r["holders"])) == R
    held = await net.holders()
    assert all(len(h) >= R for h in held.values()), held
    await net.full_check()


async def test_a_cut_link_loses_nothing_and_repair_restores_r_copies(faulty):
    net = faulty
    held = await net.holders()
    # Cut the host holding the most copies (never n0, the first writer).
    victim = max(net.hosts[1:], key=lambda h: sum(h.index in s for s in held.values()))
    mine = [g for g, s in held.items() if victim.index in s]
    assert mine
    others = [h for h in net.hosts if h is not victim]
    net.lab.cut(victim)
    try:
        # At once, before anyone noticed: its blocks are read from the other replicas.
        for g in mine[:3]:
            assert await net.get(others[0], g) == net.written[g]
        took = await net.settled(others)            # the others suspect the silent node
        print(f"cut: the others stopped routing to {victim.name} after {took:.1f} s")
        await net.full_check(others)
        await net.repaired(others)                  # r verified copies without the victim
    finally:
        net.lab.heal(victim)
    took = await net.settled(net.hosts)
    print(f"cut: {victim.name} back in every table {took:.1f} s after the heal")
    await net.full_check()


async def test_a_partition_keeps_both_sides_serving_and_healing_restores_r_copies(faulty):
    net = faulty
    held = await net.holders()
    small, large = net.hosts[:2], net.hosts[2:]
    net.lab.partition(large, small)    # the client stays with the larger side
    try:
        took = await net.settled(small, large)
        print(f"partition: each side stopped routing to the other after {took:.1f} s")
        # Each side serves every block it holds a copy of.
        for side in (small, large):
            idx = {h.index for h in side}
            for g, s in held.items():
                if s & idx:
                    reader = side[g[0] % len(side)]
                    assert await net.get(reader, g) == net.written[g], (reader.name, g.hex())
        # The larger side still takes writes at r = 3; the smaller one at r = 2.
        for i in range(3):
            await net.put(large[i], block(b"during-partition-%d" % i))
        now = await net.holders(large)
        assert all(len(now[g]) >= R for g in list(net.written)[-3:])
        r = await net.ctl(small[0], "blk.ctl.put", {"key": KEY, "kind": DATA, "r": 2,
                                                    "data": block(b"small-side")})
        net.written[r["bguid"]] = block(b"small-side")
    finally:
        net.lab.heal_partition()
    took = await net.settled(net.hosts)
    print(f"partition: the overlay merged again {took:.1f} s after the heal")
    await net.repaired(net.hosts)      # the small side's block gets its third copy
    await net.full_check()


def test_the_lab_cleans_up_after_itself():
    """A lab of its own: after close, its namespaces and processes are gone."""
    lab = open_lab()
    lab.require_faults()
    try:
        h = lab.add_host()
        p = lab.spawn(h, ["sleep", "60"])
        assert lab.pids() == [p.pid]          # ip netns exec became the process
        names = lab.namespaces()
    finally:
        lab.close()
    assert p.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_nothing_is_addressed_outside_the_lab(faulty):
    # The root namespace has no address in the lab's subnet: the lab's
    # traffic cannot leave it, and the host network is untouched.
    net = faulty
    addrs = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    assert net.lab.subnet + "." not in addrs
