"""The simulated network (overlay/wire/simnet.py) behaves as its module
docstring specifies: request/response over frames with topology latency, and
loss, partitions, link cuts, crashes and restarts with the stated semantics.
All on virtual time (``autojump_clock``) with seeded randomness."""

from __future__ import annotations

import math
import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from overlay.wire import frames
from overlay.wire.ids import Identity
from overlay.wire.simnet import PlaneTopology, SimNetwork, TransitStubTopology
from overlay.wire.transport import (
    Dispatcher,
    Peer,
    PeerAuthError,
    PeerUnreachable,
    Refused,
    RemoteError,
    RequestTimeout,
)

PING = frames.message("test.sim.ping", request={"n": int, "pad": frames.Bytes(max=1 << 16)},
                      reply={"n": int, "by": frames.GUID})
SLOW = frames.message("test.sim.slow", request={"s": float}, reply={})
NOPE = frames.message("test.sim.nope", request={}, reply={})
UNSERVED = frames.message("test.sim.unserved", request={}, reply={})
BADREPLY = frames.message("test.sim.badreply", request={}, reply={"ok": bool})
NOTE = frames.message("test.sim.note", request={"n": int}, reply={})

_IDS = [Identity.from_seed(b"simnet-test-%d" % i) for i in range(8)]


class LightId:
    """The simulator needs only ``.id``; scale tests skip Ed25519 keys."""

    __slots__ = ("id",)

    def __init__(self, i: int):
        self.id = i.to_bytes(4, "big") * 8


class Counting:
    """A node's services for these tests; remembers what it started and
    finished, to observe cancellation by a crash."""

    def __init__(self, me: bytes):
        self.me = me
        self.started = 0
        self.finished = 0
        self.d = Dispatcher()
        self.d.on(PING, self.ping)
        self.d.on(SLOW, self.slow)
        self.d.on(NOPE, self.nope)
        self.d.on(BADREPLY, self.badreply)
        self.d.on(NOTE, self.note)
        self.notes: list[tuple[bytes, int, float]] = []

    async def ping(self, sender, body):
        return {"n": body["n"] + 1, "by": self.me}

    async def slow(self, sender, body):
        self.started += 1
        await trio.sleep(body["s"])
        self.finished += 1
        return {}

    async def nope(self, sender, body):
        raise Refused("not_found", "no such thing")

    async def badreply(self, sender, body):
        return {"ok": "not a bool"}

    async def note(self, sender, body):
        self.notes.append((sender, body["n"], trio.current_time()))
        if body["n"] < 0:
            raise Refused("no", "negative")
        return {}


async def start(nursery, net, n, **kw):
    """Add and serve ``n`` nodes; return (transports, services)."""
    ts, svcs = [], []
    for i in range(n):
        t = net.add(_IDS[i], **kw)
        s = Counting(t.id)
        await nursery.start(t.serve, s.d)
        ts.append(t)
        svcs.append(s)
    return ts, svcs


def ping(n=1):
    return {"n": n, "pad": b""}


async def test_round_trip_takes_two_one_way_latencies(autojump_clock):
    net = SimNetwork(seed=1, topology=PlaneTopology(seed=1))
    async with trio.open_nursery() as nursery:
        (a, b), _ = await start(nursery, net, 2)
        assert a.address == "sim:" + a.id.hex()
        one_way = net.latency(a.id, b.id)
        assert one_way == net.latency(b.id, a.id) > 0
        t0 = trio.current_time()
        reply = await a.request(b.peer, PING, ping(41), timeout=5)
        assert reply == {"n": 42, "by": b.id}
        assert trio.current_time() - t0 == pytest.approx(2 * one_way)
        s = net.stats
        assert s.sent[PING] == s.delivered[PING] == s.replies_delivered[PING] == 1
        assert net.stats.bytes[PING] > 0 and net.stats.messages() == 2
        before = net.stats.copy()
        await b.request(a.peer, PING, ping())
        await b.request(a.peer, PING, ping())
        assert net.stats.since(before).messages(PING) == 4
        assert net.stats.since(before).sent == {PING: 2}
        assert a.stats.sent[PING] == 1 and b.stats.received[PING] == 1
        nursery.cancel_scope.cancel()


async def test_one_way_takes_one_latency_and_sends_nothing_back(autojump_clock):
    net = SimNetwork(seed=1, topology=PlaneTopology(seed=1))
    async with trio.open_nursery() as nursery:
        (a, b), (_, sb) = await start(nursery, net, 2)
        t0 = trio.current_time()
        await a.send(b.peer, NOTE, {"n": 1})
        await a.send(b.peer, NOTE, {"n": -1})       # a refusal stays at b
        assert trio.current_time() == t0             # the sender does not wait
        await trio.sleep(1.0)
        # (sent in the same instant: in either order)
        assert sorted((s, n) for s, n, _ in sb.notes) == [(a.id, -1), (a.id, 1)]
        assert sb.notes[0][2] - t0 == pytest.approx(net.latency(a.id, b.id))
        s = net.stats
        assert s.sent[NOTE] == s.delivered[NOTE] == 2 and s.replies_sent[NOTE] == 0
        assert b.stats.received[NOTE] == 2 and s.messages(NOTE) == 2
        nursery.cancel_scope.cancel()


async def test_one_way_faults(autojump_clock):
    """Loss and partitions drop one-way messages silently; a down node that
    refuses, or an address of another node, fails the send after a round
    trip; a crash cancels messages in flight to the node."""
    net = SimNetwork(seed=3, topology=PlaneTopology(seed=3))
    async with trio.open_nursery() as nursery:
        (a, b, c), (_, sb, sc) = await start(nursery, net, 3)
        net.set_loss(0.5)
        for i in range(200):
            await a.send(b.peer, NOTE, {"n": i})
        await trio.sleep(1.0)
        assert 60 < len(sb.notes) < 140 and net.stats.drop_reasons["loss"] == 200 - len(sb.notes)
        net.set_loss(0.0)
        net.partition([a.id])
        await a.send(c.peer, NOTE, {"n": 1})
        await trio.sleep(1.0)
        assert sc.notes == [] and net.stats.drop_reasons["partition"] == 1
        net.heal()
        with pytest.raises(PeerAuthError):
            await a.send(Peer(c.id, b.address), NOTE, {"n": 1})
        await a.send(c.peer, NOTE, {"n": 2})
        net.crash(c.id)                              # while it is on its way
        await trio.sleep(1.0)
        assert sc.notes == []
        await a.send(c.peer, NOTE, {"n": 3})         # black-holed: no error
        c._refuse = True
        with pytest.raises(PeerUnreachable):
            await a.send(c.peer, NOTE, {"n": 4})
        nursery.cancel_scope.cancel()


async def test_refusal_unserved_and_unregistered_types(autojump_clock):
    net = SimNetwork(seed=2)
    async with trio.open_nursery() as nursery:
        (a, b), _ = await start(nursery, net, 2)
        with pytest.raises(RemoteError) as e:
            await a.request(b.peer, NOPE, {})
        assert (e.value.code, e.value.msg, e.value.peer_id) == ("not_found", "no such thing", b.id)
        with pytest.raises(RemoteError) as e:
            await a.request(b.peer, UNSERVED, {})
        assert e.value.code == "unsupported"
        # A reply that breaks its own schema is the handler's bug: "internal".
        with pytest.raises(RemoteError) as e:
            await a.request(b.peer, BADREPLY, {})
        assert e.value.code == "internal"
        with pytest.raises(ValueError):
            await a.request(b.peer, "test.sim.never-registered", {})
        nursery.cancel_scope.cancel()


async def test_outgoing_bad_body_is_a_value_error(autojump_clock):
    net = SimNetwork(seed=3)
    async with trio.open_nursery() as nursery:
        (a, b), _ = await start(nursery, net, 2)
        for body in ({"n": "x", "pad": b""}, {"n": 1}, {"n": 1, "pad": b"", "extra": 1}):
            with pytest.raises(ValueError):
                await a.request(b.peer, PING, body)
        assert net.stats.sent[PING] == 0
        nursery.cancel_scope.cancel()


async def test_timeout(autojump_clock):
    net = SimNetwork(seed=4)
    async with trio.open_nursery() as nursery:
        (a, b), (_, sb) = await start(nursery, net, 2)
        t0 = trio.current_time()
        with pytest.raises(RequestTimeout):
            await a.request(b.peer, SLOW, {"s": 100.0}, timeout=3)
        assert trio.current_time() - t0 == pytest.approx(3)
        assert a.stats.errors["RequestTimeout"] == 1
        # The handler keeps running after the caller gave up, as on a real peer.
        await trio.sleep(200)
        assert sb.finished == 1
        nursery.cancel_scope.cancel()


async def test_crash_cancels_handlers_and_silences_the_node(autojump_clock):
    net = SimNetwork(seed=5)
    async with trio.open_nursery() as nursery:
        (a, b, c), (_, sb, _) = await start(nursery, net, 3)
        results = []

        async def call_slow():
            try:
                await a.request(b.peer, SLOW, {"s": 50.0}, timeout=20)
            except Exception as e:
                results.append(type(e))

        async def wait_on_c():
            try:
                await b.request(c.peer, SLOW, {"s": 50.0}, timeout=100)
            except Exception as e:
                results.append(type(e))

        assert b.serving
        nursery.start_soon(call_slow)
        nursery.start_soon(wait_on_c)
        await trio.sleep(5)
        assert sb.started == 1
        net.crash(b.id)
        assert not net.is_up(b.id) and not b.serving
        await trio.sleep(60)
        assert sb.finished == 0                         # in-flight handler cancelled
        assert sorted(r.__name__ for r in results) == ["PeerUnreachable", "RequestTimeout"]
        with pytest.raises(RequestTimeout):             # black hole
            await a.request(b.peer, PING, ping(), timeout=2)
        with pytest.raises(PeerUnreachable):            # its own requests
            await b.request(a.peer, PING, ping())
        with pytest.raises(RuntimeError):               # must restart before serving
            await b.serve(sb.d)
        nursery.cancel_scope.cancel()


async def test_serve_returns_on_crash_and_restart_serves_again(autojump_clock):
    net = SimNetwork(seed=6)
    async with trio.open_nursery() as nursery:
        (a, b), (_, sb) = await start(nursery, net, 2)
        net.crash(a.id)
        net.crash(a.id)                                 # idempotent
        with pytest.raises(PeerUnreachable):
            await a.request(b.peer, PING, ping())
        # serve() of a crashed node returns by itself.
        c = net.add(_IDS[2])
        returned = trio.Event()

        async def serve_c():
            await c.serve(Counting(c.id).d)
            returned.set()
        nursery.start_soon(serve_c)
        await trio.sleep(1)
        net.crash(c.id)
        await returned.wait()

        net.restart(a.id)
        with pytest.raises(RequestTimeout):             # up, but not serving yet
            await b.request(a.peer, PING, ping(), timeout=2)
        assert (await a.request(b.peer, PING, ping(1)))["n"] == 2
        await nursery.start(a.serve, Counting(a.id).d)
        assert (await b.request(a.peer, PING, ping(7))) == {"n": 8, "by": a.id}
        nursery.cancel_scope.cancel()


async def test_restart_and_serve_in_the_same_instant(autojump_clock):
    # The old serve() unwinds after the new one started (in an order trio
    # picks at random, hence the repetitions); it must not unregister the
    # new one.
    net = SimNetwork(seed=61)
    async with trio.open_nursery() as nursery:
        (a, b), (_, sb) = await start(nursery, net, 2)
        for i in range(30):
            net.crash(b.id)
            net.restart(b.id)
            await nursery.start(b.serve, sb.d)
            await trio.sleep(1)
            assert b.serving
            assert (await a.request(b.peer, PING, ping(i)))["n"] == i + 1
        nursery.cancel_scope.cancel()


async def test_refuse_when_down_fails_fast(autojump_clock):
    net = SimNetwork(seed=7, refuse_when_down=True)
    async with trio.open_nursery() as nursery:
        (a, b), _ = await start(nursery, net, 2)
        net.crash(b.id)
        t0 = trio.current_time()
        with pytest.raises(PeerUnreachable):
            await a.request(b.peer, PING, ping(), timeout=30)
        assert trio.current_time() - t0 == pytest.approx(2 * net.latency(a.id, b.id))
        # per-node override: this one black-holes even on a refusing network
        c = net.add(_IDS[2], refuse_when_down=False)
        with pytest.raises(RequestTimeout):
            await a.request(c.peer, PING, ping(), timeout=1)
        nursery.cancel_scope.cancel()


async def test_partition_and_heal(autojump_clock):
    net = SimNetwork(seed=8)
    async with trio.open_nursery() as nursery:
        ts, _ = await start(nursery, net, 5)
        a, b, c, d, e = ts
        net.partition([a.id, b.id], [c.id])             # d, e: "the rest"
        assert (await a.request(b.peer, PING, ping()))["by"] == b.id
        assert (await d.request(e.peer, PING, ping()))["by"] == e.id
        for x, y in ((a, c), (c, a), (a, d), (c, e), (e, b)):
            assert not net.connected(x.id, y.id)
            with pytest.raises(RequestTimeout):
                await x.request(y.peer, PING, ping(), timeout=1)
        assert net.stats.drop_reasons["partition"] == 5
        # A new partition replaces the old one.
        net.partition([a.id])
        assert (await b.request(c.peer, PING, ping()))["by"] == c.id
        net.heal()
        for x, y in ((a, c), (c, a), (a, d), (c, e), (e, b)):
            assert (await x.request(y.peer, PING, ping()))["by"] == y.id
        with pytest.raises(ValueError):
            net.partition([a.id], [a.id, b.id])
        nursery.cancel_scope.cancel()


async def test_partition_drops_messages_in_flight(autojump_clock):
    net = SimNetwork(seed=9)
    async with trio.open_nursery() as nursery:
        (a, b), (_, sb) = await start(nursery, net, 2)
        out = []

        async def call():
            try:
                await a.request(b.peer, SLOW, {"s": 10.0}, timeout=30)
                out.append("ok")
            except RequestTimeout:
                out.append("timeout")
        nursery.start_soon(call)
        await trio.sleep(5)                             # handler running on b
        net.partition([a.id])
        await trio.sleep(10)
        net.heal()                                      # too late for the reply
        await trio.sleep(30)
        assert sb.finished == 1 and out == ["timeout"]
        nursery.cancel_scope.cancel()


async def test_link_cut_and_restore(autojump_clock):
    net = SimNetwork(seed=10)
    async with trio.open_nursery() as nursery:
        (a, b, c), _ = await start(nursery, net, 3)
        net.cut(b.id, a.id)
        for x, y in ((a, b), (b, a)):
            with pytest.raises(RequestTimeout):
                await x.request(y.peer, PING, ping(), timeout=1)
        assert (await a.request(c.peer, PING, ping()))["by"] == c.id
        assert (await c.request(b.peer, PING, ping()))["by"] == b.id
        net.restore(a.id, b.id)
        assert (await a.request(b.peer, PING, ping()))["by"] == b.id
        net.cut(a.id, b.id)
        net.heal()
        assert (await b.request(a.peer, PING, ping()))["by"] == a.id
        assert net.stats.drop_reasons["cut"] == 2
        nursery.cancel_scope.cancel()


async def _loss_run(seed, p, n_requests):
    net = SimNetwork(seed=seed, loss=p)
    ok = 0
    async with trio.open_nursery() as nursery:
        (a, b), _ = await start(nursery, net, 2)
        for i in range(n_requests):
            try:
                await a.request(b.peer, PING, ping(i), timeout=1)
                ok += 1
            except RequestTimeout:
                pass
        nursery.cancel_scope.cancel()
    return ok, net.stats.copy()


async def test_loss_rate_is_as_configured_and_deterministic(autojump_clock):
    n, p = 2000, 0.1
    ok, stats = await _loss_run(11, p, n)
    # A request succeeds if neither it nor its reply is lost: (1 - p)^2.
    expect = n * (1 - p) ** 2
    assert abs(ok - expect) < 4 * math.sqrt(n * 0.19 * 0.81)
    assert stats.drop_reasons["loss"] == stats.dropped[PING] == n - ok
    ok2, stats2 = await _loss_run(11, p, n)
    assert (ok2, stats2.dropped) == (ok, stats.dropped)
    ok3, _ = await _loss_run(12, p, n)
    assert ok3 != ok                                    # another seed, other losses


async def test_losses_of_different_callers_are_independent(autojump_clock):
    # Each of 300 callers makes its first request to one server: their
    # replies must not share one loss draw.
    n, p = 300, 0.3
    net = SimNetwork(seed=18, loss=p)

    async def handler(sender, msg_type, body):
        return {"n": 0, "by": server.id}
    server = net.add(LightId(0))
    callers = [net.add(LightId(i)) for i in range(1, n + 1)]
    ok = []

    async def call(c):
        try:
            await c.request(server.peer, PING, ping(), timeout=1)
            ok.append(c)
        except RequestTimeout:
            pass
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, handler)
        async with trio.open_nursery() as calls:
            for c in callers:
                calls.start_soon(call, c)
        nursery.cancel_scope.cancel()
    q = (1 - p) ** 2
    assert abs(len(ok) - n * q) < 4 * math.sqrt(n * q * (1 - q))
    assert net.stats.dropped[PING] == n - len(ok)


async def test_set_loss_bounds_and_extremes(autojump_clock):
    net = SimNetwork(seed=13)
    with pytest.raises(ValueError):
        net.set_loss(1.5)
    async with trio.open_nursery() as nursery:
        (a, b), _ = await start(nursery, net, 2)
        net.set_loss(1.0)
        with pytest.raises(RequestTimeout):
            await a.request(b.peer, PING, ping(), timeout=1)
        net.set_loss(0.0)
        assert (await a.request(b.peer, PING, ping()))["by"] == b.id
        nursery.cancel_scope.cancel()


async def test_wrong_node_id_is_an_auth_error(autojump_clock):
    net = SimNetwork(seed=14)
    async with trio.open_nursery() as nursery:
        (a, b, c), _ = await start(nursery, net, 3)
        t0 = trio.current_time()
        with pytest.raises(PeerAuthError):
            await a.request(Peer(c.id, b.address), PING, ping())
        assert trio.current_time() - t0 == pytest.approx(2 * net.latency(a.id, b.id))
        with pytest.raises(PeerUnreachable):
            await a.request(Peer(c.id, "sim:" + "00" * 32), PING, ping())
        with pytest.raises(PeerUnreachable):
            await a.request(Peer(c.id, "tcp:127.0.0.1:1"), PING, ping())
        with pytest.raises(ValueError):
            net.add(_IDS[0])                            # already on the network
        nursery.cancel_scope.cancel()


async def test_no_encode_mode_behaves_the_same(autojump_clock):
    net = SimNetwork(seed=15, encode=False)
    async with trio.open_nursery() as nursery:
        (a, b), _ = await start(nursery, net, 2)
        assert (await a.request(b.peer, PING, ping(1))) == {"n": 2, "by": b.id}
        with pytest.raises(RemoteError) as e:
            await a.request(b.peer, NOPE, {})
        assert e.value.code == "not_found"
        with pytest.raises(ValueError):
            await a.request(b.peer, "test.sim.never-registered", {})
        assert net.stats.bytes[PING] == 0 and net.stats.replies_delivered[PING] == 1
        nursery.cancel_scope.cancel()


def _garbage_examples():
    valid = frames.encode(frames.Kind.REQUEST, PING, 1, ping())
    envelope = st.fixed_dictionaries({
        "v": st.sampled_from([1, 2, "1"]), "k": st.integers(-1, 3),
        "t": st.sampled_from([PING, NOPE, "nope", ""]), "i": st.integers(-2, 2**64 - 1),
        "b": st.dictionaries(st.text(max_size=3),
                             st.none() | st.integers(-2**63, 2**63 - 1) | st.binary(max_size=40)
                             | st.text(max_size=5), max_size=3)})
    import msgpack

    def framed(payload):
        return len(payload).to_bytes(4, "big") + payload
    return st.one_of(
        st.binary(max_size=64),
        envelope.map(lambda e: framed(msgpack.packb(e, use_bin_type=True))),
        st.binary(min_size=1, max_size=len(valid) - 1).map(lambda b: valid[:len(b)]),
        st.integers(0, len(valid) - 1).map(lambda i: valid[:i] + b"\xc1" + valid[i + 1:]),
    )


@settings(max_examples=150, deadline=None)
@given(garbage=_garbage_examples())
def test_garbage_never_crashes_the_receiver(garbage):
    async def main():
        net = SimNetwork(seed=16)
        async with trio.open_nursery() as nursery:
            (a, b), _ = await start(nursery, net, 2)
            try:
                raw = await a.request_raw(b.peer, garbage, timeout=2)
            except RequestTimeout:
                pass        # black-holed, as a closed connection would be
            else:
                # If it happened to be a valid request, the answer is a frame.
                frames.decode(raw[frames.HEADER_BYTES:])
            assert b.serving
            assert (await a.request(b.peer, PING, ping(5)))["n"] == 6
            nursery.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_topologies_are_deterministic_symmetric_and_local():
    ids = [bytes([i]) * 32 for i in range(200)]
    for make in (lambda s: PlaneTopology(s, size_ms=80, access_ms=(1, 2)),
                 lambda s: TransitStubTopology(s)):
        t1, t2 = make(3), make(3)
        for i in ids:
            t1.place(i)
            t2.place(i)
        rng = random.Random(0)
        for _ in range(500):
            x, y, z = rng.sample(ids, 3)
            assert t1.latency(x, y) == t2.latency(x, y) == t1.latency(y, x) > 0
            # a metric: no shortcut through a third node
            assert t1.latency(x, y) <= t1.latency(x, z) + t1.latency(z, y) + 1e-12
        assert t1.latency(ids[0], ids[0]) == 0
        with pytest.raises(ValueError):
            t1.place(ids[0])
    ts = TransitStubTopology(1, transits=3, stubs_per_transit=2)
    for i, nid in enumerate(ids[:6]):
        ts.place(nid, position=i)           # one node per stub
    same_transit = ts.latency(ids[0], ids[1])
    cross = [ts.latency(ids[0], ids[j]) for j in range(2, 6)]
    assert all(same_transit < c for c in cross)
    ts.place(b"x" * 32, position=0)
    assert ts.latency(ids[0], b"x" * 32) < same_transit  # same stub is closest
    p = PlaneTopology(0, access_ms=(0, 0))
    p.place(b"a", (0, 0))
    p.place(b"b", (30, 40))
    assert p.latency(b"a", b"b") == pytest.approx(0.050)


async def test_two_thousand_nodes_ping_random_pairs(autojump_clock):
    n = 2000
    net = SimNetwork(seed=17, topology=TransitStubTopology(17))

    def handler_of(me):
        async def handler(sender, msg_type, body):
            return {"n": body["n"] + 1, "by": me}
        return handler

    ts = [net.add(LightId(i)) for i in range(n)]
    async with trio.open_nursery() as nursery:
        for t in ts:
            await nursery.start(t.serve, handler_of(t.id))
        rng = random.Random(17)
        done = []

        async def one(i):
            x, y = rng.sample(ts, 2)
            r = await x.request(y.peer, PING, ping(i), timeout=5)
            done.append(r == {"n": i + 1, "by": y.id})

        async with trio.open_nursery() as pings:
            for i in range(3000):
                pings.start_soon(one, i)
        assert len(done) == 3000 and all(done)
        assert net.stats.replies_delivered[PING] == 3000
        nursery.cancel_scope.cancel()
