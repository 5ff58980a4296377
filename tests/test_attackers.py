"""Attacker scenarios (issue 10): a node that drops or misroutes the
messages it should carry, and a peer that floods another with requests.
Each is contained, and legitimate users keep working (DESIGN.md "What must
always hold"; SECURITY.md "Routing attacks": integrity always holds,
availability is defended by salted roots, several replicas and readers'
fall-back to further holders).

What already covers neighbouring attacks: forged blocks
(``test_replication_sim.py``), a NodeID not matching its key, replayed and
relayed proofs, garbage, oversized and truncated frames, many bad
connections at once and the per-peer and per-connection bounds
(``test_tls.py``), equivocating ring members (``test_ring_byzantine.py``).

The Byzantine nodes here are honest code with their message handling
replaced from outside, test-only (:class:`Byzantine`): the node's
dispatcher is wrapped, nothing in ``overlay/`` or ``storage/`` knows. Such
a node answers ``tap.route`` and ``tap.publish_batch`` the way an honest hop
does (an immediate acknowledgement, so the previous hop believes the
message is carried on), then

* ``drop``: forgets the message (and, as a holder, never answers
  ``blk.fetch``: it withholds its copies);
* ``misroute``: hands it to a neighbour that is *not* a next hop for the
  target, claiming one more digit resolved, so the route ends at a wrong
  "root" that has no pointers and knows nothing of the object.

The tests:

* publish and locate with the busiest of 24 nodes dropping, or
  misrouting, every routed message, some objects having it as the root of
  their first salt: every locate from every reader finds the holder (the
  other salted roots); and the control: with one salt the same attacker
  does hide objects, so it is the salts that defend;
* blocks put and read (one by one through ``locate``, and in batches by
  placement) among 12 storage nodes, one dropping routed messages and
  withholding its copies, another misrouting: every block reads back
  byte-identical from other replicas, and puts made after the two turned
  still get r copies;
* a flood of valid requests over one connection: bounded by the server's
  per-connection handler cap, honest clients on their own connections
  keep being answered.

Overlay and block scenarios run on the simulated network (virtual time: a
route that never returns costs the origin's 15 s route timeout for free);
the flood runs on the real TLS transport on loopback.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter

import pytest
import trio

from overlay import messages as m
from overlay.config import OverlayConfig
from overlay.node import TapestryNode
from overlay.routing_table import global_root
from overlay.wire import frames
from overlay.wire.frames import Kind
from overlay.wire.ids import Identity, shared_prefix_len
from overlay.wire.simnet import PlaneTopology, SimNetwork
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Dispatcher
from storage import blockservice as bs
from storage.blockapi import Kind as BlockKind
from storage.blockstore import BlockStore
from storage.server import StorageNode

from rawtls import RawTls

ROUTED = (m.ROUTE, m.PUBLISH_BATCH)
VOLUME = bytes(range(32))


class Byzantine:
    """Wraps ``node``'s dispatcher (module docstring). Counts what it did
    in ``did`` (``dropped``, ``misrouted``, ``withheld``)."""

    def __init__(self, node: TapestryNode, mode: str, seed: int = 0):
        assert mode in ("drop", "misroute")
        self.node, self.mode = node, mode
        self.inner = node.dispatcher
        self.rng = random.Random(seed)
        self.did: Counter = Counter()
        node.dispatcher = self          # TapestryNode._handle looks it up per request

    async def __call__(self, sender: bytes, msg_type: str, body: dict) -> dict:
        if msg_type in ROUTED:
            if self.mode == "drop":
                self.did["dropped"] += 1
            else:
                self.node.spawn(self._misroute, msg_type, body)
            return {}                   # acknowledged, like an honest hop
        if msg_type == bs.FETCH and self.mode == "drop":
            self.did["withheld"] += 1
            await trio.sleep_forever()  # the requester's timeout ends it
        return await self.inner(sender, msg_type, body)

    def _wrong_hop(self, target: bytes, level: int):
        """A neighbour that does not share one more digit with the target."""
        wrong = [p for p in self.node.table.neighbours()
                 if shared_prefix_len(p.id, target) <= level]
        return self.rng.choice(wrong).peer if wrong else None

    async def _misroute(self, msg_type: str, body: dict) -> None:
        level = body["level"]
        target = body["target"] if msg_type == m.ROUTE else body["entries"][0]["target"]
        hop = self._wrong_hop(target, level)
        if hop is None or level >= 63:
            self.did["dropped"] += 1
            return
        onward = dict(body, level=level + 1, hops=min(body["hops"] + 1, 255))
        try:
            await self.node.transport.request(hop, msg_type, onward,
                                              timeout=self.node.config.hop_timeout)
            self.did["misrouted"] += 1
        except Exception:  # noqa: BLE001 - an attacker does not care
            self.did["dropped"] += 1


# --------------------------------------------------------------------------
# The overlay: publish and locate around a Byzantine hop


class Overlay:
    """Tapestry nodes on a simulated network inside one nursery."""

    def __init__(self, nursery, seed: int, config: OverlayConfig):
        self.nursery = nursery
        self.net = SimNetwork(seed=seed, topology=PlaneTopology(seed=seed))
        self.rnd = random.Random(seed)
        self.seed = seed
        self.config = config
        self.nodes: dict[bytes, TapestryNode] = {}

    async def grow(self, n: int) -> None:
        for i in range(n):
            ident = Identity.from_seed(b"attack-%d-%d" % (self.seed, i))
            node = TapestryNode(self.net.add(ident), config=self.config)
            await self.nursery.start(node.run)
            if self.nodes:
                await node.join(self.rnd.choice(list(self.nodes.values())).peer)
            self.nodes[node.id] = node

    def objects_rooted_at(self, root: bytes, n: int) -> list[bytes]:
        """``n`` GUIDs whose first salted root is ``root``: every publish and
        locate under salt 0 must end there."""
        ids, out = sorted(self.nodes), []
        while len(out) < n:
            g = self.rnd.randbytes(32)
            if global_root(m.salted(g, 0), ids) == root:
                out.append(g)
        return out

    def busiest(self) -> TapestryNode:
        """The node most others list as a neighbour (most routes pass it)."""
        listed = Counter(nb.id for n in self.nodes.values() for nb in n.table.neighbours())
        return self.nodes[listed.most_common(1)[0][0]]


async def publish_and_locate_around(mode: str, seed: int, config: OverlayConfig
                                    ) -> tuple[Byzantine, dict]:
    """24 nodes, the busiest one Byzantine (``mode``), objects published by
    honest holders and located by honest readers; returns the attacker and
    the locates that did not find the one holder of their object."""
    async with trio.open_nursery() as nursery:
        o = Overlay(nursery, seed, config)
        await o.grow(24)
        evil = Byzantine(o.busiest(), mode, seed)
        honest = [n for n in o.nodes.values() if n is not evil.node]
        # Objects whose salt-0 root is the Byzantine node, and others whose
        # routes merely pass it (its neighbours are everywhere).
        objs = o.objects_rooted_at(evil.node.id, 6) + [o.rnd.randbytes(32) for _ in range(8)]
        holders = {g: o.rnd.choice(honest) for g in objs}
        # All at once: a route the attacker swallows costs its origin the
        # route timeout (virtual time), and meanwhile the others go on.
        async with trio.open_nursery() as n:
            for g, h in holders.items():
                n.start_soon(h.publish, g)
        found: dict = {}

        async def locate(reader: TapestryNode, g: bytes) -> None:
            found[reader.id, g] = [p.id for p in await reader.locate(g)]

        async with trio.open_nursery() as n:
            for g in objs:
                for reader in o.rnd.sample(honest, 4):
                    n.start_soon(locate, reader, g)
        wrong = {(r.hex()[:8], g.hex()[:8]): f for (r, g), f in found.items()
                 if f != [holders[g].id]}
        nursery.cancel_scope.cancel()
    return evil, wrong


@pytest.mark.parametrize("mode", ["drop", "misroute"])
async def test_a_node_that_drops_or_misroutes_routed_messages_hides_no_object(
        mode, autojump_clock):
    """Publishes and locates of 14 objects (6 of them rooted, under their
    first salt, at the attacker) from 4 readers each: every locate finds
    the holder through the other salted roots."""
    evil, wrong = await publish_and_locate_around(mode, 21, OverlayConfig())
    assert not wrong, (mode, wrong)
    # The attack happened: routes through it were dropped or misrouted.
    assert evil.did["dropped" if mode == "drop" else "misrouted"] > 0, evil.did
    print(f"{mode}: {dict(evil.did)}")


@pytest.mark.parametrize("mode", ["drop", "misroute"])
async def test_with_one_salt_the_same_attacker_hides_objects(mode, autojump_clock):
    """The control: with a single root per object (no salts) the same
    attacker makes locates fail, so the defence above is the salted roots."""
    evil, wrong = await publish_and_locate_around(mode, 21, OverlayConfig(salts=1))
    assert wrong, f"{mode} hid nothing with one salt: the attack did not bite"


# --------------------------------------------------------------------------
# Blocks: put and read with a dropping holder and a misrouting node


EPOCH0 = 1.7e9


def clock() -> float:
    return EPOCH0 + trio.current_time()


async def test_blocks_are_stored_and_read_around_a_dropping_and_a_misrouting_node(
        nursery, tmp_path, autojump_clock):
    net = SimNetwork(seed=5, topology=PlaneTopology(seed=5))
    nodes: list[StorageNode] = []
    stores: dict[bytes, BlockStore] = {}
    try:
        for i in range(12):
            ident = Identity.from_seed(b"attack-blocks-%d" % i)
            store = BlockStore(tmp_path / f"n{i}", quota=64 << 20, sync=False, clock=clock)
            sn = StorageNode(net.add(ident), store, inline=True, clock=clock)
            await nursery.start(sn.run, [n.peer for n in nodes][:1])
            nodes.append(sn)
            stores[sn.id] = store
        # Routing settles into full tables before the attack starts.
        await trio.sleep(60)
        listed = Counter(nb.id for sn in nodes for nb in sn.node.table.neighbours())
        ranked = sorted(nodes, key=lambda sn: -listed[sn.id])
        writer = ranked[2]
        rnd = random.Random(5)
        data = [rnd.randbytes(rnd.randint(500, 6000)) for _ in range(40)]
        # The first half is stored while everyone is honest; then two nodes
        # turn: their copies are withheld from now on. The second half is
        # stored around them.
        gs = await writer.blocks(VOLUME).put_many([(BlockKind.DATA, d) for d in data[:20]])
        dropper = Byzantine(ranked[0].node, "drop", 1)
        misrouter = Byzantine(ranked[1].node, "misroute", 2)
        evil = {dropper.node.id, misrouter.node.id}
        honest = [sn for sn in nodes if sn.id not in evil]
        gs += await writer.blocks(VOLUME).put_many([(BlockKind.DATA, d) for d in data[20:]])
        held = {g: {i for i, s in stores.items() if s.has(g)} for g in gs}
        assert all(len(h) >= 3 for h in held.values()), held
        withheld = [g for g in gs if dropper.node.id in held[g]]
        assert withheld, "the dropping node holds none of the blocks: no test"

        # Every block reads back from other readers, one by one (locate) and
        # in batches (placement), whatever the two do.
        got: dict = {}

        async def get(reader: StorageNode, g: bytes) -> None:
            got[reader.id, g] = await reader.blocks(VOLUME).get(g, BlockKind.DATA)

        readers = [sn for sn in honest if sn is not writer][:3]
        async with trio.open_nursery() as n:
            for reader in readers:
                for g in gs:
                    n.start_soon(get, reader, g)
        assert all(got[r.id, g] == d for r in readers for g, d in zip(gs, data))
        for reader in readers:
            assert await reader.blocks(VOLUME).get_many([(g, BlockKind.DATA) for g in gs]) \
                == data
        print(f"blocks: dropper {dict(dropper.did)}, misrouter {dict(misrouter.did)}, "
              f"{len(withheld)} of {len(gs)} blocks had a copy on the dropper")
        assert dropper.did["dropped"] > 0 and dropper.did["withheld"] > 0, dropper.did
        assert misrouter.did["misrouted"] > 0, misrouter.did
    finally:
        for sn in nodes:
            sn.stop()
        for s in stores.values():
            s.close()


# --------------------------------------------------------------------------
# A flood of valid requests on one connection


SLOW = frames.message("test.attack.slow", request={"n": int}, reply={"n": int})
ECHO = frames.message("test.attack.echo", request={"data": bytes}, reply={"data": bytes})


async def test_a_flood_of_requests_on_one_connection_starves_no_one(nursery):
    """An authenticated peer pipelines 20,000 valid requests to a handler
    that parks them and never reads a reply. The server runs at most
    ``max_handlers_per_conn`` of them at once (TCP back-pressure holds the
    rest in the flooder's buffers) and keeps answering honest clients on
    their own connections. (Frames over the size cap close the connection
    at once: ``test_tls.py``.)"""
    bound = 16
    parked = {"now": 0, "peak": 0, "total": 0}
    release = trio.Event()

    async def slow(sender: bytes, body: dict) -> dict:
        parked["now"] += 1
        parked["total"] += 1
        parked["peak"] = max(parked["peak"], parked["now"])
        try:
            await release.wait()
        finally:
            parked["now"] -= 1
        return {"n": body["n"]}

    async def echo(sender: bytes, body: dict) -> dict:
        return {"data": body["data"]}

    d = Dispatcher()
    d.on(SLOW, slow)
    d.on(ECHO, echo)
    server = TlsTransport(Identity.generate(), max_handlers_per_conn=bound)
    await nursery.start(server.serve, d)
    flooder = await RawTls.connect(server)
    await flooder.login(Identity.generate())
    flood = b"".join(frames.encode(Kind.REQUEST, SLOW, i + 1, {"n": i}) for i in range(20_000))
    async with contextlib.AsyncExitStack() as stack:
        honest = [await stack.enter_async_context(TlsTransport(Identity.generate()))
                  for _ in range(3)]
        async with trio.open_nursery() as attack:
            attack.start_soon(flooder.stream.send_all, flood)    # blocks once buffers fill
            with trio.fail_after(60):
                while parked["now"] < bound:
                    await trio.sleep(0.01)
            with trio.fail_after(120):       # generous: no timing assertion, only "answered"
                async with trio.open_nursery() as n:
                    for c in honest:
                        for i in range(30):
                            n.start_soon(_echo_once, c, server, b"honest %d" % i)
            # Still parked at the bound: the rest of the flood waits in buffers.
            assert parked["peak"] == bound and parked["total"] == bound, parked
            attack.cancel_scope.cancel()
        release.set()
    await trio.aclose_forcefully(flooder.stream)
    await server.aclose()


async def _echo_once(client: TlsTransport, server: TlsTransport, data: bytes) -> None:
    assert await client.request(server.peer, ECHO, {"data": data}) == {"data": data}
