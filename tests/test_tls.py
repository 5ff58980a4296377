"""The real transport (overlay/wire/tls.py) on loopback: TLS 1.3 between two
nodes, connection reuse, multiplexing and bounds, timeouts and cancellation,
the NodeID checks both ways (server certificate; client proof against forged
keys, replay and relay), and bad peers: garbage, oversized and truncated
frames, each closing only its own connection."""

from __future__ import annotations

import datetime
import functools
import logging
import ssl

import msgpack
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings, strategies as st

from overlay.wire import certs, frames, handshake
from overlay.wire.frames import Kind
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from rawtls import RawTls as Raw
from overlay.wire.transport import (
    Dispatcher,
    Peer,
    PeerAuthError,
    PeerProtocolError,
    PeerUnreachable,
    Refused,
    RemoteError,
    RequestTimeout,
)

ECHO = frames.message("test.tls.echo", request={"data": frames.Bytes(max=1 << 20)},
                      reply={"data": bytes, "sender": frames.GUID})
GATE = frames.message("test.tls.gate", request={"n": int}, reply={"n": int})
NOBODY = frames.message("test.tls.nobody", request={})
ONE = frames.message("test.tls.one-way", request={"n": int}, reply={"n": int})

SERVER = Identity.from_seed(b"test-tls-server")
CLIENT = Identity.from_seed(b"test-tls-client")
OTHER = Identity.from_seed(b"test-tls-other")
MALLORY = Identity.from_seed(b"test-tls-mallory")

LOG = "overlay.wire.tls"


class Gate:
    """A handler that parks requests until opened, counting how many run at
    once: the probe for concurrency and its bounds."""

    def __init__(self):
        self.opened = trio.Event()
        self.active = 0
        self.peak = 0
        self.arrived = 0
        self._watch: tuple[int, trio.Event] | None = None

    async def __call__(self, sender, body):
        self.active += 1
        self.arrived += 1
        self.peak = max(self.peak, self.active)
        if self._watch and self.arrived >= self._watch[0]:
            self._watch[1].set()
        try:
            await self.opened.wait()
        finally:
            self.active -= 1
        return {"n": body["n"]}

    async def wait_arrived(self, n: int) -> None:
        if self.arrived < n:
            self._watch = (n, trio.Event())
            await self._watch[1].wait()


async def echo(sender, body):
    if body["data"] == b"refuse":
        raise Refused("not_found", "no such thing")
    return {"data": body["data"], "sender": sender}


def dispatcher(gate: Gate | None = None) -> Dispatcher:
    d = Dispatcher()
    d.on(ECHO, echo)
    d.on(GATE, gate or Gate())
    return d


async def start(nursery, identity, handler=None, **kw) -> TlsTransport:
    t = TlsTransport(identity, **kw)
    await nursery.start(t.serve, handler or dispatcher())
    return t


@pytest.fixture
async def server(nursery):
    t = await start(nursery, SERVER)
    yield t
    await t.aclose()


@pytest.fixture
async def client(nursery):
    t = await start(nursery, CLIENT)
    yield t
    await t.aclose()


# -- a hand-driven client and server, for attacks and garbage -------------------


def warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name == LOG and r.levelno >= logging.WARNING)


async def good_round_trip(client: TlsTransport, server: TlsTransport) -> None:
    reply = await client.request(server.peer, ECHO, {"data": b"still here"})
    assert reply == {"data": b"still here", "sender": client.id}


# -- two honest nodes ---------------------------------------------------------------


async def test_round_trip_both_ways_names_the_sender(server, client):
    assert (await client.request(server.peer, ECHO, {"data": b"hi"})
            == {"data": b"hi", "sender": CLIENT.id})
    assert (await server.request(client.peer, ECHO, {"data": b"yo"})
            == {"data": b"yo", "sender": SERVER.id})
    with pytest.raises(RemoteError) as e:
        await client.request(server.peer, ECHO, {"data": b"refuse"})
    assert (e.value.code, e.value.peer_id) == ("not_found", SERVER.id)
    with pytest.raises(RemoteError, match="unsupported"):
        await client.request(server.peer, NOBODY, {})
    assert client.stats.sent[ECHO] == 2 and server.stats.received[ECHO] == 2


async def test_many_requests_share_one_connection(server, client):
    for i in range(20):
        await client.request(server.peer, ECHO, {"data": bytes([i])})
    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(client.request, server.peer, ECHO, {"data": bytes([i])})
    assert client.connections_opened == 1 and server.connections_accepted == 1
    assert client.connection_count() == (1, 0) and server.connection_count() == (0, 1)


async def test_concurrent_first_requests_share_one_connect(nursery, server):
    fresh = await start(nursery, OTHER)
    replies = {}

    async def one(i):
        replies[i] = await fresh.request(server.peer, ECHO, {"data": i.to_bytes(2, "big")})

    async with trio.open_nursery() as n:
        for i in range(300):
            n.start_soon(one, i)
    # every caller got its own answer back, over one connection
    assert all(replies[i]["data"] == i.to_bytes(2, "big") for i in range(300))
    assert fresh.connections_opened == 1
    await fresh.aclose()


async def test_handlers_run_concurrently(nursery, client):
    gate = Gate()
    server = await start(nursery, SERVER, dispatcher(gate))
    async with trio.open_nursery() as n:
        for i in range(30):
            n.start_soon(client.request, server.peer, GATE, {"n": i})
        await gate.wait_arrived(30)  # all 30 inside the handler at once
        gate.opened.set()
    assert gate.peak == 30


@pytest.mark.parametrize("side", ["client", "server"])
async def test_in_flight_requests_are_bounded(nursery, side):
    gate = Gate()
    bound = 4
    server = await start(nursery, SERVER, dispatcher(gate),
                         **({"max_handlers_per_conn": bound} if side == "server" else {}))
    client = await start(nursery, CLIENT,
                         **({"max_inflight_per_peer": bound} if side == "client" else {}))
    results = []

    async def one(i):
        results.append((await client.request(server.peer, GATE, {"n": i}))["n"])

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(one, i)
        await gate.wait_arrived(bound)
        await trio.sleep(0.2)  # room for a bound violation to show
        assert gate.active == bound
        gate.opened.set()
    assert sorted(results) == list(range(20)) and gate.peak == bound
    await client.aclose()
    await server.aclose()


async def test_timeout_leaves_connection_usable(nursery, client):
    gate = Gate()
    server = await start(nursery, SERVER, dispatcher(gate))
    with pytest.raises(RequestTimeout) as e:
        await client.request(server.peer, GATE, {"n": 1}, timeout=0.3)
    assert e.value.peer_id == SERVER.id
    gate.opened.set()  # its late reply arrives now, and is dropped
    assert (await client.request(server.peer, GATE, {"n": 2}))["n"] == 2
    await good_round_trip(client, server)
    assert client.connections_opened == 1
    assert client.stats.errors["RequestTimeout"] == 1


async def test_cancelled_caller_does_not_disturb_others(nursery, client):
    gate = Gate()
    server = await start(nursery, SERVER, dispatcher(gate))
    results = []

    async def one(i):
        results.append((await client.request(server.peer, GATE, {"n": i}))["n"])

    victim = trio.CancelScope()

    async def cancelled_caller():
        with victim:
            await client.request(server.peer, GATE, {"n": 42})
            results.append(42)

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(one, i)
        n.start_soon(cancelled_caller)
        await gate.wait_arrived(6)
        victim.cancel()  # mid-request: sent, its handler running, no reply yet
        for i in range(5, 8):  # and new requests after it
            n.start_soon(one, i)
        await gate.wait_arrived(9)
        gate.opened.set()
    assert victim.cancelled_caught
    assert sorted(results) == list(range(8))  # everyone else got an answer
    await good_round_trip(client, server)
    assert client.connections_opened == 1


async def test_idle_connection_is_closed_and_reopened(nursery, server):
    client = await start(nursery, CLIENT, idle_timeout=0.2)
    await good_round_trip(client, server)
    with trio.fail_after(10):
        while client.connection_count() != (0, 0) or server.connection_count() != (0, 0):
            await trio.sleep(0.05)
    await good_round_trip(client, server)
    assert client.connections_opened == 2
    await client.aclose()


async def test_client_only_transport(server):
    with pytest.raises(RuntimeError, match="async with"):
        await TlsTransport(OTHER).request(server.peer, ECHO, {"data": b""})
    async with TlsTransport(OTHER) as t:
        assert t.address is None
        reply = await t.request(server.peer, ECHO, {"data": b"x"})
    assert reply["sender"] == OTHER.id
    assert t.connection_count() == (0, 0)


async def test_handshake_types_are_not_requests(server, client):
    with pytest.raises(ValueError):
        await client.request(server.peer, handshake.HELLO, {"node": SERVER.id, "nonce": b"n" * 32})


async def unused_port() -> int:
    """A loopback port that was just free: bound, then closed again."""
    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, None, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        n.cancel_scope.cancel()
    return port


async def test_unreachable_peers(client):
    port = await unused_port()
    with pytest.raises(PeerUnreachable, match="cannot connect"):
        await client.request(Peer(SERVER.id, f"127.0.0.1:{port}"), ECHO, {"data": b""})
    with pytest.raises(PeerUnreachable, match="host:port"):
        await client.request(Peer(SERVER.id, "nonsense"), ECHO, {"data": b""})


async def test_one_way_frames_run_in_order_in_the_reader(nursery, client):
    """One-way frames (Transport.send) are handled by the connection's
    reader, one after the other in the order sent, with no reply frame;
    a blocked one-way handler holds up only its own connection."""
    seen: list[int] = []
    release = trio.Event()

    async def note(sender, body):
        if body["n"] == 0:
            await release.wait()            # the first one blocks the connection
        seen.append(body["n"])
        return {"n": body["n"]}

    d = dispatcher()
    d.on(ONE, note)
    server = await start(nursery, SERVER, d)
    for i in range(50):
        await client.send(server.peer, ONE, {"n": i})
    await trio.sleep(0.2)
    assert seen == []                        # all behind the blocked first one
    async with TlsTransport(OTHER) as other:  # another connection is served meanwhile
        reply = await other.request(server.peer, ECHO, {"data": b"x"})
        assert reply["sender"] == OTHER.id
    release.set()
    with trio.fail_after(5):
        while len(seen) < 50:
            await trio.sleep(0.01)
    assert seen == list(range(50))
    assert server.stats.received[ONE] == 50
    assert client.stats.sent[ONE] == 50
    await good_round_trip(client, server)
    await server.aclose()


@pytest.mark.parametrize("quick", [True, False])
async def test_quick_requests_are_answered_by_the_reader_in_order(nursery, client, quick):
    """Requests the dispatcher calls quick (``Dispatcher.on(..., quick=)``,
    ``serve(inline=)``) are handled by the connection's reader, one at a
    time in the order they came, with the usual replies and refusals;
    others get a task each and overlap."""
    gate = Gate()
    d = Dispatcher()
    d.on(ECHO, echo, quick=lambda body: quick)
    d.on(GATE, gate, quick=lambda body: quick and body["n"] % 2 == 0)
    server = TlsTransport(SERVER)
    await nursery.start(functools.partial(server.serve, d, inline=d.quick))
    assert d.quick(ECHO, {"data": b""}) is quick and d.quick("test.tls.nobody", {}) is False
    replies = []
    async with trio.open_nursery() as n:
        async def one(i):
            replies.append((await client.request(server.peer, GATE, {"n": i}))["n"])
        for i in (0, 2, 4):             # even: quick when quick is on
            n.start_soon(one, i)
            await trio.sleep(0.05)
        await gate.wait_arrived(1)
        await trio.sleep(0.2)
        # Inline, the first holds up the connection's reader; else all three are in.
        assert gate.arrived == (1 if quick else 3)
        gate.opened.set()
    assert sorted(replies) == [0, 2, 4] and gate.peak == (1 if quick else 3)
    with pytest.raises(RemoteError) as e:
        await client.request(server.peer, ECHO, {"data": b"refuse"})
    assert e.value.code == "not_found"
    await good_round_trip(client, server)   # the connection is still fine
    await server.aclose()


async def test_one_way_to_unreachable_peers(client):
    port = await unused_port()
    with pytest.raises(PeerUnreachable, match="cannot connect"):
        await client.send(Peer(SERVER.id, f"127.0.0.1:{port}"), ONE, {"n": 1})


async def test_aclose_fails_pending_requests_and_stops_serving(nursery, client):
    gate = Gate()
    server = await start(nursery, SERVER, dispatcher(gate))
    peer = server.peer
    async with trio.open_nursery() as n:
        async def one():
            with pytest.raises(PeerUnreachable):
                await client.request(peer, GATE, {"n": 1})
        for _ in range(3):
            n.start_soon(one)
        await gate.wait_arrived(3)
        await server.aclose()
    assert server.address is None
    with pytest.raises(PeerUnreachable):
        await client.request(peer, ECHO, {"data": b""})


# -- NodeID checks --------------------------------------------------------------------


async def test_server_key_not_matching_expected_id_is_refused(server, client, caplog):
    with pytest.raises(PeerAuthError, match="server key hashes to"):
        await client.request(Peer(OTHER.id, server.address), ECHO, {"data": b""})
    assert "server key hashes to" in warnings(caplog)
    assert client.stats.errors["PeerAuthError"] == 1
    await good_round_trip(client, server)  # the right id still works


async def test_server_with_non_ed25519_certificate_is_refused(nursery, client, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    pem = tmp_path / "impostor.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)

    async def impostor(tcp):
        s = trio.SSLStream(tcp, ctx, server_side=True)
        await s.do_handshake()
        await s.receive_some()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, impostor, 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(PeerAuthError, match="not Ed25519"):
        await client.request(Peer(SERVER.id, f"127.0.0.1:{port}"), ECHO, {"data": b""})


async def test_raw_client_with_honest_proof_is_served(server):
    raw = await Raw.connect(server)
    await raw.login(OTHER)
    await raw.send(frames.encode(Kind.REQUEST, ECHO, 7, {"data": b"raw"}))
    reply = await raw.frame()
    assert (reply.kind, reply.id, reply.body) == (Kind.REPLY, 7, {"data": b"raw",
                                                                  "sender": OTHER.id})
    await raw.aclose()


def refused(verdict) -> str:
    assert verdict is not None and verdict.kind == Kind.ERROR
    assert verdict.body["code"] == handshake.AUTH_CODE
    return verdict.body["msg"]


async def test_client_claiming_an_id_whose_key_it_lacks_is_refused(server, client, caplog):
    # 1. OTHER's NodeID with Mallory's key, which signs a proof for that ID
    # that verifies under her key; but her key does not hash to the ID.
    raw = await Raw.connect(server)
    nonce = await raw.hello()
    body = {"node": OTHER.id, "key": MALLORY.public_key,
            "sig": MALLORY.sign(handshake.proof_payload(SERVER.id, OTHER.id, nonce))}
    assert "hashes to" in refused(await raw.send_proof(body))
    assert await raw.closed_by_peer()
    await raw.aclose()
    # 2. OTHER's NodeID and OTHER's public key, but Mallory's signature.
    raw = await Raw.connect(server)
    nonce = await raw.hello()
    body = handshake.proof_body(OTHER, SERVER.id, nonce)
    body["sig"] = MALLORY.sign(handshake.proof_payload(SERVER.id, OTHER.id, nonce))
    assert "does not verify" in refused(await raw.send_proof(body))
    assert await raw.closed_by_peer()
    await raw.aclose()
    assert warnings(caplog).count("from ?@127.0.0.1") >= 2
    assert server.connections_accepted == 0
    await good_round_trip(client, server)


async def test_replayed_proof_is_refused(server, caplog):
    first = await Raw.connect(server)
    old_nonce = await first.hello()
    captured = handshake.proof_body(OTHER, SERVER.id, old_nonce)
    assert (await first.send_proof(captured)).type == handshake.READY  # it was good once
    await first.aclose()

    second = await Raw.connect(server)
    new_nonce = await second.hello()
    assert new_nonce != old_nonce
    assert "does not verify" in refused(await second.send_proof(captured))
    assert await second.closed_by_peer()
    await second.aclose()
    assert "replayed, relayed or forged" in warnings(caplog)


async def test_relayed_proof_is_refused(server, caplog):
    # Mallory gets SERVER's nonce and has OTHER prove itself to her (OTHER
    # signs for Mallory's NodeID, the node it thinks it talks to); she passes
    # the proof on to SERVER.
    raw = await Raw.connect(server)
    nonce = await raw.hello()
    proof_for_mallory = handshake.proof_body(OTHER, MALLORY.id, nonce)
    assert "does not verify" in refused(await raw.send_proof(proof_for_mallory))
    assert await raw.closed_by_peer()
    await raw.aclose()
    assert server.connections_accepted == 0
    assert f"proof of {OTHER.id[:4].hex()} does not verify" in warnings(caplog)


async def test_handshake_out_of_order_is_a_protocol_error(server, caplog):
    raw = await Raw.connect(server)
    await raw.hello()
    await raw.send(frames.encode(Kind.REQUEST, ECHO, 1, {"data": b"before proof"}))
    assert await raw.closed_by_peer()
    await raw.aclose()
    assert "expected wire.proof" in warnings(caplog)


async def test_silent_client_is_dropped_after_handshake_timeout(nursery, caplog):
    caplog.set_level(logging.DEBUG, logger=LOG)
    server = await start(nursery, SERVER, handshake_timeout=0.3)
    raw = await Raw.connect(server)
    await raw.hello()
    assert await raw.closed_by_peer()  # it never sent a proof
    await raw.aclose()
    assert "handshake timed out" in caplog.text
    await server.aclose()


# -- bad frames close one connection, never the node ---------------------------------


def envelope(**over) -> bytes:
    env = {"v": 1, "k": 0, "t": ECHO, "i": 1, "b": {"data": b""}}
    env.update(over)
    payload = msgpack.packb(env, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xff\xff\xff", "exceeds cap"),
    (b"\x00\x00\x00\x00", "empty frame"),
    ((3).to_bytes(4, "big") + b"\xc1\xc1\xc1", "not a msgpack frame"),
    (envelope(t="test.tls.no-such-type"), "unknown message type"),
    (envelope(b={"data": "text, not bytes"}), "expected bytes"),
    (envelope(b={"data": b"", "extra": 1}), "unknown key"),
    (envelope(v=2), "protocol version"),
    (envelope(i="1"), "request id"),
    (envelope(k=int(Kind.REPLY), b={"data": b"", "sender": SERVER.id}), "not a request"),
    (envelope(t=handshake.READY, b={"node": SERVER.id}), "after the handshake"),
])
async def test_bad_frame_closes_only_that_connection(nursery, client, caplog, data, reason):
    gate = Gate()
    server = await start(nursery, SERVER, dispatcher(gate))
    async with trio.open_nursery() as n:
        # a good client with a request in flight on its own connection
        n.start_soon(client.request, server.peer, GATE, {"n": 1})
        await gate.wait_arrived(1)
        bad = await Raw.connect(server)
        await bad.login(OTHER)
        await bad.send(data)
        assert await bad.closed_by_peer()
        await bad.aclose()
        gate.opened.set()  # the good request completes on its untouched connection
    assert reason in warnings(caplog)
    assert "from " + OTHER.id[:4].hex() in warnings(caplog)  # the log names the peer
    await good_round_trip(client, server)
    assert client.connections_opened == 1
    await server.aclose()


@pytest.mark.parametrize("graceful", [True, False])
async def test_truncated_frame_then_close(server, client, caplog, graceful):
    bad = await Raw.connect(server)
    await bad.login(OTHER)
    await bad.send((100).to_bytes(4, "big") + b"x" * 10)
    if graceful:
        await bad.stream.aclose()  # TLS close_notify, then TCP close
    else:
        await bad.aclose()  # TCP close only
    with trio.fail_after(10):
        while "truncated frame" not in warnings(caplog):
            await trio.sleep(0.02)
    await good_round_trip(client, server)


async def test_many_bad_connections_at_once(server, client):
    async def attack(i):
        raw = await Raw.connect(server)
        if i % 2:
            await raw.login(OTHER)
        await raw.send(b"\x00\x00\x00\x05garbage" * (i + 1))
        await raw.closed_by_peer()
        await raw.aclose()

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(attack, i)
        for _ in range(10):
            n.start_soon(good_round_trip, client, server)
    assert server.connection_count() == (0, 1)


# Hypothesis: any bytes, before or after authentication.

_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12,
)
_envelope = st.fixed_dictionaries({
    "v": st.sampled_from([1, 1, 2, "1", None]),
    "k": st.integers(-1, 3),
    "t": st.sampled_from([ECHO, GATE, handshake.HELLO, handshake.PROOF, "", "nope"]),
    "i": st.integers(-1, 2**64 - 1),
    "b": _value,
})


def _framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


garbage = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.binary(max_size=300).map(_framed),
    _value.map(lambda v: _framed(msgpack.packb(v, use_bin_type=True))),
    _envelope.map(lambda v: _framed(msgpack.packb(v, use_bin_type=True))),
)


@settings(deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(garbage, min_size=1, max_size=4), login=st.booleans(),
       close=st.booleans())
async def test_garbage_never_crashes_the_node(chunks, login, close):
    async with trio.open_nursery() as nursery:
        server = await start(nursery, SERVER, handshake_timeout=2.0)
        good = await start(nursery, CLIENT)
        raw = await Raw.connect(server)
        if login:
            await raw.login(OTHER)
        else:
            await raw.hello()
        for chunk in chunks:
            await raw.send(chunk)
        if close:
            await raw.aclose()
        # serve() still runs (a crash would fail this nursery) and answers others
        await good_round_trip(good, server)
        await raw.aclose()
        nursery.cancel_scope.cancel()


# -- a misbehaving server: the client side's defences ---------------------------------


async def evil_server(nursery, identity: Identity, script) -> Peer:
    """A server that passes the handshake honestly, then runs ``script(stream,
    request_frame)`` on the first request it receives."""
    ctx = certs.server_context(identity)

    async def handle(tcp):
        s = trio.SSLStream(tcp, ctx, server_side=True)
        await s.do_handshake()
        raw = Raw(s)
        nonce = handshake.new_nonce()
        await s.send_all(handshake.hello_frame(identity, nonce))
        client_id = handshake.check_proof(await raw.frame(), identity.id, nonce)
        await s.send_all(handshake.ready_frame(client_id))
        await script(s, await raw.frame())

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0,
                                                      host="127.0.0.1"))
    return Peer(identity.id, f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")


async def _garbage_reply(s, req):
    await s.send_all(b"\x00\x00\x00\x03abc")
    await trio.sleep_forever()


async def _wrong_type_reply(s, req):
    await s.send_all(frames.encode(Kind.REPLY, GATE, req.id, {"n": 1}))
    await trio.sleep_forever()


async def _request_from_server(s, req):
    await s.send_all(frames.encode(Kind.REQUEST, ECHO, 1, {"data": b""}))
    await trio.sleep_forever()


async def _unknown_id(s, req):
    await s.send_all(frames.encode(Kind.REPLY, ECHO, req.id + 1000,
                                   {"data": b"", "sender": SERVER.id}))
    await trio.sleep_forever()


async def _hang_up(s, req):
    await s.aclose()


@pytest.mark.parametrize("script, error, reason", [
    (_garbage_reply, PeerProtocolError, "not a msgpack frame"),
    (_wrong_type_reply, PeerProtocolError, "reply to a test.tls.echo request"),
    (_request_from_server, PeerProtocolError, "server sent a test.tls.echo request"),
    (_unknown_id, PeerProtocolError, "never sent"),
    (_hang_up, PeerUnreachable, "peer closed the connection"),
])
async def test_misbehaving_server_fails_pending_requests(nursery, client, caplog,
                                                        script, error, reason):
    peer = await evil_server(nursery, SERVER, script)
    with pytest.raises(error, match=reason) as e:
        await client.request(peer, ECHO, {"data": b"x"})
    assert e.value.peer_id == SERVER.id
    if error is PeerProtocolError:
        assert reason in warnings(caplog)
    assert client.connection_count() == (0, 0)
