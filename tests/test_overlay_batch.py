"""Batched publishing (overlay/publish_batch.py, ``DolrAPI.publish_many``) on
the simulated network, on virtual time.

The reference is the single publish: two networks built from the same seed,
one publishing objects one by one, the other in batches, must end with the
same pointer records on every node (object, holder, salted target, epoch,
rooted or not, the nodes each pointer came from and went to), for far fewer
messages. Then: objects are located from everywhere, next hops that died
(not yet noticed) are routed around, periodic republish and hand-over go by
batches, and malformed or oversized batch frames are refused while the node
goes on serving."""

from __future__ import annotations

import random

import msgpack
import pytest
import trio

from overlay import messages as m
from overlay.config import OverlayConfig
from overlay.node import TapestryNode
from overlay.routing_table import global_root
from overlay.wire import frames
from overlay.wire.ids import Identity, digits
from overlay.wire.simnet import PlaneTopology, SimNetwork
from overlay.wire.transport import RemoteError, RequestTimeout

# Maintenance off: tables must not change between the two networks' runs
# (republish would also blur which publish left a pointer).
STILL = OverlayConfig(heartbeat_interval=0, repair_interval=0, republish_interval=0)


class Net:
    """A simulated network of ``n`` Tapestry nodes joined one by one."""

    def __init__(self, nursery, seed: int, config: OverlayConfig = STILL):
        self.nursery = nursery
        self.seed = seed
        self.net = SimNetwork(seed=seed, topology=PlaneTopology(seed=seed))
        self.rnd = random.Random(seed)
        self.config = config
        self.nodes: dict[bytes, TapestryNode] = {}
        self.count = 0

    async def add(self, ident: Identity | None = None) -> TapestryNode:
        ident = ident or Identity.from_seed(b"batch-%d-%d" % (self.seed, self.count))
        self.count += 1
        node = TapestryNode(self.net.add(ident), config=self.config)
        await self.nursery.start(node.run)
        if self.nodes:
            await node.join(self.nodes[self.rnd.choice(sorted(self.nodes))].peer)
        self.nodes[node.id] = node
        return node

    async def grow(self, n: int) -> "Net":
        for _ in range(n):
            await self.add()
        return self

    def crash(self, node_id: bytes) -> None:
        self.net.crash(node_id)
        self.nodes.pop(node_id).stop()

    def ids(self) -> list[bytes]:
        return sorted(self.nodes)

    def pointer_records(self) -> dict:
        """Every node's pointers, without their expiry times (virtual time
        differs between two runs by the messages they send)."""
        return {nid: {(p.obj, p.holder.id, p.target): (p.epoch, p.rooted,
                                                        frozenset(p.prev_hops),
                                                        frozenset(p.sent_to))
                      for p in node.pointers.all()}
                for nid, node in self.nodes.items()}

    def tables(self) -> dict:
        return {nid: [(n.id, n.suspect_since) for n in node.table.neighbours()]
                for nid, node in self.nodes.items()}


def workload(ids: list[bytes], seed: int, holders: int = 3, per_holder: int = 80):
    rnd = random.Random(seed)
    return {h: [rnd.randbytes(32) for _ in range(per_holder)] for h in rnd.sample(ids, holders)}


def fix_epochs(net: Net, work: dict) -> None:
    # Epochs are wall-clock milliseconds: give both runs the same ones.
    for h, objs in work.items():
        for i, g in enumerate(objs):
            net.nodes[h].published[g] = 1_000_000 + i


def messages(net: Net, before) -> dict:
    return {k: v for k, v in net.net.stats.since(before).sent.items() if v}


async def test_publish_many_leaves_exactly_the_pointers_of_single_publishes(autojump_clock):
    runs = {}
    for how in ("single", "batch"):
        async with trio.open_nursery() as nursery:
            net = await Net(nursery, seed=21).grow(40)
            work = workload(net.ids(), 21)
            fix_epochs(net, work)
            before = net.net.stats.copy()
            if how == "single":
                # The per-message routed publish (confirmed: the same hops,
                # plus a result from each root).
                async with trio.open_nursery() as n:
                    for h, objs in work.items():
                        for g in objs:
                            n.start_soon(net.nodes[h].publish, g)
            else:
                async with trio.open_nursery() as n:
                    for h, objs in work.items():
                        n.start_soon(net.nodes[h].publish_many, objs)
            await trio.sleep(5)   # unconfirmed: let every batch reach its roots
            sent = messages(net, before)
            runs[how] = (net.tables(), net.pointer_records(), sent)
            if how == "batch":
                # Every object is found, from anywhere, at its holder.
                for h, objs in work.items():
                    for g in objs[:10]:
                        src = net.nodes[net.rnd.choice(net.ids())]
                        assert [p.id for p in await src.locate(g)] == [h]
                # Each salted target is rooted at its unique root.
                ids = net.ids()
                for h, objs in work.items():
                    for g in objs:
                        for i in range(3):
                            t = m.salted(g, i)
                            p = net.nodes[global_root(t, ids)].pointers.get(g, h, t)
                            assert p is not None and p.rooted and p.epoch == \
                                net.nodes[h].published[g]
            nursery.cancel_scope.cancel()
    (tables_s, ptrs_s, sent_s), (tables_b, ptrs_b, sent_b) = runs["single"], runs["batch"]
    assert tables_s == tables_b           # the same network, built twice
    assert sum(len(v) for v in ptrs_s.values()) > 3 * 240   # at least one per hop
    for nid in ptrs_s:
        assert ptrs_b[nid] == ptrs_s[nid], f"pointers differ on {nid[:4].hex()}"
    # The batches carried it all in a fraction of the messages.
    assert "tap.route" not in sent_b and "tap.pointer" not in sent_b
    singles = sent_s["tap.route"] + sent_s.get("tap.pointer", 0)
    batched = sent_b["tap.publish_batch"] + sent_b.get("tap.pointer_batch", 0)
    assert batched * 10 < singles, (sent_s, sent_b)


async def test_publish_of_one_object_is_a_batch_and_locate_finds_it(autojump_clock):
    async with trio.open_nursery() as nursery:
        net = await Net(nursery, seed=22).grow(24)
        h = net.nodes[net.ids()[3]]
        g = b"\x5a" * 32
        before = net.net.stats.copy()
        assert await h.publish(g, confirm=False) == []
        assert await h.publish_many([g, g]) == {}      # duplicates collapse, same epoch
        await trio.sleep(2)
        sent = messages(net, before)
        assert sent.get("tap.publish_batch", 0) >= 1 and "tap.route" not in sent
        for nid in net.rnd.sample(net.ids(), 8):
            assert [p.id for p in await net.nodes[nid].locate(g)] == [h.id]
        # Confirmed: per object, the roots that answered.
        roots = await h.publish_many([g, b"\x5b" * 32], confirm=True)
        assert {r.id for r in roots[g]} == {global_root(m.salted(g, i), net.ids())
                                             for i in range(3)}
        with pytest.raises(ValueError):
            await h.publish_many([b"short"])
        nursery.cancel_scope.cancel()


async def test_next_hops_that_died_unnoticed_are_routed_around(autojump_clock):
    cfg = STILL.with_(hop_timeout=0.5)
    async with trio.open_nursery() as nursery:
        net = await Net(nursery, seed=23, config=cfg).grow(40)
        holder = net.nodes[net.ids()[0]]
        objs = [net.rnd.randbytes(32) for _ in range(200)]
        # The holder's busiest first hop dies, and so does every node of
        # another first digit (a level-0 slot all dead in every table);
        # no heartbeat runs, so nobody knows yet.
        first = {}
        for g in objs:
            for i in range(3):
                hop = holder.table.next_hop(m.salted(g, i), 0)
                if hop is not None:
                    first[hop[1][0].id] = first.get(hop[1][0].id, 0) + 1
        busiest = max(first, key=first.get)
        mine = digits(holder.id)[0]
        d0 = next(d for d in range(16) if d not in (mine, digits(busiest)[0])
                  and any(digits(i)[0] == d for i in net.ids()))
        victims = {busiest} | {i for i in net.ids() if digits(i)[0] == d0}
        for v in victims:
            net.crash(v)
        await holder.publish_many(objs)
        await trio.sleep(10)
        ids = net.ids()
        assert holder.stats["suspected"] >= 1
        assert sum(n.stats["dead_slot_reroutes"] + n.stats["alternate_routes"]
                   for n in net.nodes.values()) >= 1
        for g in objs:
            for i in range(3):
                t = m.salted(g, i)
                p = net.nodes[global_root(t, ids)].pointers.get(g, holder.id, t)
                assert p is not None and p.rooted, f"{g[:4].hex()} salt {i}"
        for g in objs[:20]:
            src = net.nodes[net.rnd.choice(ids)]
            assert [p.id for p in await src.locate(g)] == [holder.id]
        nursery.cancel_scope.cancel()


async def test_republish_and_hand_over_go_by_batches(autojump_clock):
    cfg = OverlayConfig(republish_interval=2, pointer_ttl=5, heartbeat_interval=0,
                        repair_interval=0)
    async with trio.open_nursery() as nursery:
        net = await Net(nursery, seed=24, config=cfg).grow(20)
        holder = net.nodes[net.ids()[5]]
        objs = [net.rnd.randbytes(32) for _ in range(150)]
        await holder.publish_many(objs)
        gone = objs[0]
        await holder.unpublish(gone)
        before = net.net.stats.copy()
        await trio.sleep(12)          # several republish rounds, pointers expire otherwise
        sent = messages(net, before)
        assert "tap.route" not in sent and sent["tap.publish_batch"] >= 3
        ids = net.ids()
        for g in objs[1:]:
            src = net.nodes[net.rnd.choice(ids)]
            assert [p.id for p in await src.locate(g)] == [holder.id]
        assert await net.nodes[ids[0]].locate(gone) == []    # not resurrected
        # A newcomer that roots some targets receives their pointers.
        targets = {m.salted(g, i): g for g in objs[1:] for i in range(3)}
        for k in range(300):
            ident = Identity.from_seed(b"batch-newcomer-%d" % k)
            mine = [t for t in targets if global_root(t, sorted(ids + [ident.id])) == ident.id]
            if mine:
                break
        new = await net.add(ident)
        await trio.sleep(0.5)
        assert set(mine) <= {p.target for p in new.pointers.rooted()}
        nursery.cancel_scope.cancel()


def _raw_frame(body: dict, msg_type: str = m.PUBLISH_BATCH) -> bytes:
    # Packed by hand: frames.encode checks outgoing bodies and would refuse.
    payload = msgpack.packb({"v": frames.PROTOCOL_VERSION, "k": 0, "t": msg_type, "i": 7,
                             "b": body}, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


async def test_malformed_and_oversized_batches_are_refused_and_the_node_serves_on(
        autojump_clock):
    async with trio.open_nursery() as nursery:
        net = await Net(nursery, seed=25).grow(6)
        a, b = (net.nodes[i] for i in net.ids()[:2])
        entry = {"target": b"\x01" * 32, "obj": b"\x02" * 32, "epoch": 5}
        base = {"origin": m.peer_body(a.peer), "holder": m.peer_body(a.peer), "level": 0,
                "hops": 0, "entries": [entry]}
        held = len(b.pointers)
        # Schema-valid but meaningless: a coded refusal.
        with pytest.raises(RemoteError) as e:
            await a.transport.request(b.peer, m.PUBLISH_BATCH, dict(base, entries=[]))
        assert e.value.code == "bad_request"
        # Our own encoder refuses to send what breaks the schema ...
        with pytest.raises(ValueError):
            await a.transport.request(b.peer, m.PUBLISH_BATCH,
                                      dict(base, entries=[entry] * (m.MAX_BATCH + 1)))
        # ... and the receiver drops such frames (the TLS transport closes the
        # connection): too many entries, a short GUID, an unknown key, a
        # level past the last digit, a pointer batch without its holder.
        bad = [dict(base, entries=[entry] * (m.MAX_BATCH + 1)),
               dict(base, entries=[dict(entry, target=b"\x01" * 31)]),
               dict(base, entries=[dict(entry, extra=1)]),
               dict(base, level=65),
               dict(base, entries=[dict(entry, epoch=-1)])]
        for body in bad:
            with pytest.raises(RequestTimeout):
                await a.transport.request_raw(b.peer, _raw_frame(body), timeout=2)
        with pytest.raises(RequestTimeout):
            await a.transport.request_raw(b.peer, _raw_frame({"entries": [entry]},
                                                             m.POINTER_BATCH), timeout=2)
        assert len(b.pointers) == held and b.running
        # It still serves, batches included.
        assert (await a.find_root(b.id)).at.id == b.id
        await a.transport.request(b.peer, m.PUBLISH_BATCH, base)
        await trio.sleep(1)
        assert b.pointers.get(entry["obj"], a.id, entry["target"]) is not None
        nursery.cancel_scope.cancel()
