"""A TLS connection to a ``TlsTransport`` driven by hand, for tests that
attack the server or feed it garbage: frames, proofs and bytes of the
test's choosing, read only when the test asks (``test_tls``,
``test_attackers``)."""

from __future__ import annotations

import trio

from overlay.wire import certs, frames, handshake
from overlay.wire.frames import FrameBuffer, Kind
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport, parse_address


class RawTls:
    """One hand-driven connection. ``server_id`` is the NodeID the server
    must prove (None for a stream a test serves itself)."""

    def __init__(self, stream: trio.SSLStream, server_id: bytes | None = None):
        self.stream = stream
        self.server_id = server_id
        self.buf = FrameBuffer()
        self.queue: list[bytes] = []

    @classmethod
    async def connect(cls, server: TlsTransport) -> "RawTls":
        tcp = await trio.open_tcp_stream(*parse_address(server.address))
        stream = trio.SSLStream(tcp, certs.client_context(), server_hostname=None)
        await stream.do_handshake()
        certs.check_server_certificate(stream.getpeercert(binary_form=True), server.id)
        return cls(stream, server.id)

    async def frame(self) -> frames.Frame | None:
        """The next frame, or None once the peer has closed the connection."""
        with trio.fail_after(10):
            while not self.queue:
                try:
                    data = await self.stream.receive_some()
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                self.queue.extend(self.buf.feed(data))
        return frames.decode(self.queue.pop(0))

    async def hello(self) -> bytes:
        return handshake.read_hello(await self.frame(), self.server_id)

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # the server may already have hung up: that is allowed

    async def send_proof(self, body: dict) -> frames.Frame | None:
        await self.send(frames.encode(Kind.REQUEST, handshake.PROOF, 0, body))
        return await self.frame()

    async def login(self, identity: Identity) -> None:
        nonce = await self.hello()
        verdict = await self.send_proof(handshake.proof_body(identity, self.server_id, nonce))
        handshake.read_verdict(verdict, identity.id, self.server_id)

    async def closed_by_peer(self) -> bool:
        """Read until the server hangs up; False if it sends a frame first."""
        return await self.frame() is None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
