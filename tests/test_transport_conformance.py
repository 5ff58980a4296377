"""One request/response suite run on both transports (DESIGN.md, Wire: "one
transport interface, two implementations"): TCP+TLS on loopback and the
simulated network. Node code may rely on exactly what passes here on both."""

from __future__ import annotations

import pytest
import trio

from overlay.wire import frames
from overlay.wire.ids import Identity
from overlay.wire.simnet import SimNetwork
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import (
    Dispatcher,
    Peer,
    PeerAuthError,
    PeerError,
    Refused,
    RemoteError,
    RequestTimeout,
)

CAP = 256 * 1024  # frame cap of every node in this suite

ECHO = frames.message("test.conf.echo", request={"data": frames.Bytes(max=CAP), "n": int},
                      reply={"data": frames.Bytes(max=CAP), "n": int, "sender": frames.GUID})
SIZE = frames.message("test.conf.size", request={"data": frames.Bytes(max=CAP)},
                      reply={"size": int})
GROW = frames.message("test.conf.grow", request={"size": int},
                      reply={"data": frames.Bytes(max=2 * CAP)})
FAIL = frames.message("test.conf.fail", request={"how": str})
BLOCK = frames.message("test.conf.block", request={})
NOTE = frames.message("test.conf.note", request={"n": int, "how": frames.Optional(str)})
UNSERVED = frames.message("test.conf.unserved", request={})

A = Identity.from_seed(b"test-conf-a")
B = Identity.from_seed(b"test-conf-b")
C = Identity.from_seed(b"test-conf-c")


class Node:
    """Handlers of the suite, with a little state the tests look at."""

    def __init__(self):
        self.blocked = 0
        self.notes: list[tuple[bytes, int]] = []
        self.noted = trio.Event()
        self.dispatcher = Dispatcher()
        self.dispatcher.on(ECHO, self.echo)
        self.dispatcher.on(SIZE, self.size)
        self.dispatcher.on(GROW, self.grow)
        self.dispatcher.on(FAIL, self.fail)
        self.dispatcher.on(BLOCK, self.block)
        self.dispatcher.on(NOTE, self.note)

    async def echo(self, sender, body):
        await trio.sleep(0)
        return {"data": body["data"], "n": body["n"], "sender": sender}

    async def size(self, sender, body):
        return {"size": len(body["data"])}

    async def grow(self, sender, body):
        return {"data": b"g" * body["size"]}

    async def fail(self, sender, body):
        if body["how"] == "refuse":
            raise Refused("quota", "store is full")
        raise KeyError("a bug in the handler")

    async def block(self, sender, body):
        self.blocked += 1
        await trio.sleep_forever()

    async def note(self, sender, body):
        if body.get("how") == "refuse":
            raise Refused("no", "not this one")
        if body.get("how") == "crash":
            raise KeyError("a bug in the one-way handler")
        self.notes.append((sender, body["n"]))
        self.noted.set()
        return {"ignored": True}     # nobody gets this: a one-way reply is dropped

    async def wait_notes(self, k: int) -> None:
        while len(self.notes) < k:
            self.noted = trio.Event()
            await self.noted.wait()


@pytest.fixture(params=["tls", "sim"])
async def pair(request, nursery):
    """Two serving nodes (a, b) on the transport under test."""
    if request.param == "tls":
        a, b = TlsTransport(A, max_frame=CAP), TlsTransport(B, max_frame=CAP)
    else:
        net = SimNetwork(seed=1, max_frame=CAP)
        # 1 ms apart, so that the suite runs in real time without a clock
        a = net.add(A, position=(0.0, 0.0, 0.5))
        b = net.add(B, position=(0.0, 0.0, 0.5))
    a.node, b.node = Node(), Node()
    await nursery.start(a.serve, a.node.dispatcher)
    await nursery.start(b.serve, b.node.dispatcher)
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_round_trip_names_sender_and_counts(pair):
    a, b = pair
    assert a.peer == Peer(A.id, a.address)
    reply = await a.request(b.peer, ECHO, {"data": b"hello", "n": 7})
    assert reply == {"data": b"hello", "n": 7, "sender": A.id}
    reply = await b.request(a.peer, ECHO, {"data": b"", "n": -1})
    assert reply == {"data": b"", "n": -1, "sender": B.id}
    assert a.stats.sent[ECHO] == 1 and b.stats.received[ECHO] == 1
    assert a.stats.bytes_sent > 0 and b.stats.bytes_received > 0


async def test_refusal_arrives_as_remote_error_with_code(pair):
    a, b = pair
    with pytest.raises(RemoteError) as e:
        await a.request(b.peer, FAIL, {"how": "refuse"})
    assert (e.value.code, e.value.msg, e.value.peer_id) == ("quota", "store is full", B.id)
    assert not isinstance(e.value, PeerError)  # an answer, not a broken peer


async def test_handler_bug_is_an_internal_error(pair):
    a, b = pair
    with pytest.raises(RemoteError) as e:
        await a.request(b.peer, FAIL, {"how": "crash"})
    assert e.value.code == "internal" and "KeyError" in e.value.msg
    assert (await a.request(b.peer, SIZE, {"data": b"ok"})) == {"size": 2}


async def test_unknown_message_type_is_refused(pair):
    a, b = pair
    with pytest.raises(RemoteError) as e:  # registered, but b serves no such thing
        await a.request(b.peer, UNSERVED, {})
    assert e.value.code == "unsupported"
    with pytest.raises(ValueError, match="unknown message type"):  # not even registered
        await a.request(b.peer, "test.conf.never-registered", {})
    with pytest.raises(ValueError):  # a body that breaks its own schema: our bug
        await a.request(b.peer, ECHO, {"data": "not bytes", "n": 1})


async def test_timeout(pair):
    a, b = pair
    with pytest.raises(RequestTimeout) as e:
        await a.request(b.peer, BLOCK, {}, timeout=0.3)
    assert e.value.peer_id == B.id and isinstance(e.value, PeerError)
    assert b.node.blocked == 1
    assert (await a.request(b.peer, SIZE, {"data": b"after"})) == {"size": 5}


async def test_wrong_peer_id_is_an_auth_error(pair):
    a, b = pair
    with pytest.raises(PeerAuthError) as e:
        await a.request(Peer(C.id, b.address), SIZE, {"data": b""})
    assert e.value.peer_id == C.id
    assert (await a.request(b.peer, SIZE, {"data": b"x"})) == {"size": 1}


async def test_large_bodies_up_to_the_cap(pair):
    a, b = pair
    near = CAP - 200  # the envelope takes the rest
    assert (await a.request(b.peer, SIZE, {"data": b"\xab" * near})) == {"size": near}
    assert len((await a.request(b.peer, GROW, {"size": near}))["data"]) == near
    with pytest.raises(ValueError):  # over the cap: refused before sending
        await a.request(b.peer, SIZE, {"data": b"x" * CAP})
    with pytest.raises(RemoteError) as e:  # a reply over the cap: the handler's bug
        await a.request(b.peer, GROW, {"size": CAP + 10})
    assert e.value.code == "internal"
    assert (await a.request(b.peer, SIZE, {"data": b"ok"})) == {"size": 2}


async def test_many_concurrent_requests(pair):
    a, b = pair
    replies = {}

    async def one(src, dst, i):
        replies[src.id, i] = await src.request(dst.peer, ECHO, {"data": i.to_bytes(4, "big"),
                                                                "n": i})

    async with trio.open_nursery() as n:
        for i in range(200):
            n.start_soon(one, a, b, i)
            n.start_soon(one, b, a, i)
    for (src, i), r in replies.items():
        assert (r["n"], r["data"], r["sender"]) == (i, i.to_bytes(4, "big"), src)
    assert len(replies) == 400


async def test_cancelled_caller_leaves_others_unharmed(pair):
    a, b = pair
    async with trio.open_nursery() as n:
        n.start_soon(a.request, b.peer, ECHO, {"data": b"x", "n": 1})
        with trio.move_on_after(0.2):
            await a.request(b.peer, BLOCK, {})
    assert (await a.request(b.peer, ECHO, {"data": b"y", "n": 2}))["n"] == 2


# ---- one-way messages (Transport.send) ---------------------------------------------


async def test_one_way_message_reaches_the_handler_and_nothing_comes_back(pair):
    a, b = pair
    await a.send(b.peer, NOTE, {"n": 1})
    with trio.fail_after(5):
        await b.node.wait_notes(1)
    assert b.node.notes == [(A.id, 1)]
    assert a.stats.sent[NOTE] == 1 and b.stats.received[NOTE] == 1
    # The connection (or network) carries requests as before.
    assert (await a.request(b.peer, SIZE, {"data": b"abc"})) == {"size": 3}


async def test_one_way_refusals_and_bugs_stay_at_the_receiver(pair, caplog):
    a, b = pair
    await a.send(b.peer, NOTE, {"n": 1, "how": "refuse"})
    await a.send(b.peer, NOTE, {"n": 2, "how": "crash"})
    await a.send(b.peer, NOTE, {"n": 3})
    with trio.fail_after(5):
        await b.node.wait_notes(1)
    assert b.node.notes == [(A.id, 3)]
    assert "a bug in the one-way handler" in caplog.text
    assert (await a.request(b.peer, ECHO, {"data": b"", "n": 4}))["n"] == 4


async def test_many_one_way_messages_all_arrive(pair):
    a, b = pair
    async with trio.open_nursery() as n:
        for i in range(300):
            n.start_soon(a.send, b.peer, NOTE, {"n": i})
            n.start_soon(b.send, a.peer, NOTE, {"n": -i})
    with trio.fail_after(10):
        await b.node.wait_notes(300)
        await a.node.wait_notes(300)
    assert sorted(n for _, n in b.node.notes) == list(range(300))
    assert sorted(-n for _, n in a.node.notes) == list(range(300))


async def test_one_way_errors_the_sender_sees(pair):
    a, b = pair
    with pytest.raises(PeerAuthError):
        await a.send(Peer(C.id, b.address), NOTE, {"n": 1})
    with pytest.raises(ValueError):      # a body that breaks its own schema: our bug
        await a.send(b.peer, NOTE, {"n": "one"})
    await a.send(b.peer, NOTE, {"n": 2})
    with trio.fail_after(5):
        await b.node.wait_notes(1)
    assert b.node.notes == [(A.id, 2)]
