"""The TLS stream under the transport (overlay/wire/tls_stream.py): data both
ways in order whatever the write sizes, several records per receive, a clean
end (close_notify) told apart from a cut connection, tampered records
refused, a failed handshake reported, and interoperation with trio's own
SSLStream on the other end."""

from __future__ import annotations

import os
import ssl

import pytest
import trio

from overlay.wire import certs
from overlay.wire.ids import Identity
from overlay.wire.tls_stream import TlsStream

SERVER = Identity.from_seed(b"test-tls-stream-server")


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def handshake_both(client, server) -> None:
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(server.do_handshake)


async def tls_pair() -> tuple[TlsStream, TlsStream]:
    a, b = socket_pair()
    client = TlsStream(a, certs.client_context(), server_side=False)
    server = TlsStream(b, certs.server_context(SERVER), server_side=True)
    await handshake_both(client, server)
    return client, server


async def receive_exactly(stream, n: int) -> tuple[bytes, list[int]]:
    """``n`` bytes from ``stream``, and the size of each receive."""
    got, sizes = bytearray(), []
    while len(got) < n:
        data = await stream.receive_some()
        assert data, "stream ended early"
        sizes.append(len(data))
        got += data
    return bytes(got), sizes


async def test_data_both_ways_in_order_with_many_records_per_receive():
    client, server = await tls_pair()
    small = [os.urandom(n) for n in (1, 10, 1000, 5000)] * 20
    big = os.urandom(3 << 20)
    expect = b"".join(small) + big
    async with trio.open_nursery() as n:
        async def send():
            for chunk in small:
                await client.send_all(chunk)
            await client.send_all(big[:100], big[100:])   # several chunks in one send
        n.start_soon(send)
        got, sizes = await receive_exactly(server, len(expect))
    assert got == expect
    # The server's peer certificate is the node's, and the big write came
    # back in receives of several TLS records (16 KiB of plaintext each).
    assert certs.certificate_key(client.getpeercert(binary_form=True)) == SERVER.public_key
    assert max(sizes) > 16 * 1024
    # And the other way, with the writer flushing an empty send as well.
    await server.send_all()
    await server.send_all(b"pong")
    assert (await receive_exactly(client, 4))[0] == b"pong"
    await client.aclose()
    await server.aclose()


async def test_close_notify_is_a_clean_end():
    client, server = await tls_pair()
    await client.send_all(b"last words")
    await client.aclose()
    assert (await receive_exactly(server, 10))[0] == b"last words"
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""   # and stays ended
    await client.aclose()                       # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"more")
    await server.aclose()


async def test_a_cut_connection_is_broken_not_ended():
    client, server = await tls_pair()
    await client.send_all(b"partial")
    await client.transport_stream.aclose()      # TCP closed without close_notify
    assert (await receive_exactly(server, 7))[0] == b"partial"
    with pytest.raises(trio.BrokenResourceError) as e:
        await server.receive_some()
    assert isinstance(e.value.__cause__, ssl.SSLError)
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await server.aclose()


async def test_a_tampered_record_breaks_the_stream():
    # client -> relay (flips one byte of application data) -> server
    a, relay_in = socket_pair()
    relay_out, b = socket_pair()
    client = TlsStream(a, certs.client_context(), server_side=False)
    server = TlsStream(b, certs.server_context(SERVER), server_side=True)
    flip = trio.Event()

    async def relay(src, dst, tamper: bool):
        try:
            while data := await src.receive_some(65536):
                if tamper and flip.is_set():
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x01
                    tamper = False   # one byte only
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as n:
        n.start_soon(relay, relay_in, relay_out, True)
        n.start_soon(relay, relay_out, relay_in, False)
        await handshake_both(client, server)
        await client.send_all(b"intact")
        assert (await receive_exactly(server, 6))[0] == b"intact"
        flip.set()
        await client.send_all(os.urandom(4000))
        with pytest.raises(trio.BrokenResourceError) as e:
            await server.receive_some()
        assert isinstance(e.value.__cause__, ssl.SSLError)
        n.cancel_scope.cancel()
    for s in (client, server, relay_in, relay_out):
        await s.aclose()


async def test_handshake_with_a_peer_that_does_not_speak_tls_fails():
    a, b = socket_pair()
    server = TlsStream(b, certs.server_context(SERVER), server_side=True)
    await a.send_all(b"GET / HTTP/1.0\r\n\r\n" * 4)
    with pytest.raises(trio.BrokenResourceError, match="handshake") as e:
        await server.do_handshake()
    assert isinstance(e.value.__cause__, ssl.SSLError)
    await server.aclose()
    await a.aclose()


@pytest.mark.parametrize("ours", ["client", "server"])
async def test_interoperates_with_trio_sslstream(ours):
    a, b = socket_pair()
    if ours == "client":
        mine = TlsStream(a, certs.client_context(), server_side=False)
        theirs = trio.SSLStream(b, certs.server_context(SERVER), server_side=True)
    else:
        mine = TlsStream(b, certs.server_context(SERVER), server_side=True)
        theirs = trio.SSLStream(a, certs.client_context(), server_hostname=None)
    await handshake_both(mine, theirs)
    payload = os.urandom(1 << 20)
    async with trio.open_nursery() as n:
        n.start_soon(mine.send_all, payload)
        got = bytearray()
        while len(got) < len(payload):
            got += await theirs.receive_some()
    assert got == payload
    await theirs.send_all(b"reply")
    assert (await receive_exactly(mine, 5))[0] == b"reply"
    await theirs.aclose()                     # its close_notify: a clean end here
    assert await mine.receive_some() == b""
    await mine.aclose()
