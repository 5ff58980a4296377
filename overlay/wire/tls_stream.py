"""TLS over a trio socket for the frame transport (DESIGN.md, Wire; used by
``tls.py``, which owns everything else about connections).

Why not ``trio.SSLStream``: its ``receive_some`` returns at most one TLS
record (16 KiB of plaintext) per call, and every call goes through a general
retry loop (locks, conflict detectors, a checkpoint) built for any number of
tasks sharing one stream. Receiving one MiB took 64 such passes, about half of
a node's CPU for a stream of blocks. A connection of ``tls.py`` has one
reading task and one writing task, which allows a plainer design:

* receive: one socket read of up to ``RECV_BYTES``, then every whole record
  it completed decrypted in one tight loop, returned as one chunk;
* send: everything to send encrypted into the outgoing memory BIO, then one
  socket send of all of it;
* handshake and close as trio does them: the handshake loop alternates
  sending OpenSSL's output and feeding it input; ``aclose`` sends
  close_notify without waiting for the peer's (both allowed by TLS 1.3).

What the caller guarantees (``tls._Link``): ``do_handshake`` completes before
any other call; then at most one task is in ``receive_some`` and at most one
in ``send_all`` at any time; ``aclose`` runs when neither is. Bytes OpenSSL
produces while reading (TLS 1.3 post-handshake messages, for example a key
update answer) wait in the outgoing BIO for the next ``send_all``;
``output_pending`` tells the reader so that it can wake the writer.

Errors are trio's: ``trio.BrokenResourceError`` (its ``__cause__`` the
``ssl.SSLError`` when TLS failed, such as a record failing authentication or
a stream ending without close_notify) once the stream is unusable;
``receive_some`` returns ``b""`` after the peer's close_notify.
"""

from __future__ import annotations

import os
import ssl
import threading

import trio

RECV_BYTES = 256 * 1024   # one socket read: up to 16 records
_RECORD = 16 * 1024       # the largest plaintext of one TLS record
_SCRATCH = RECV_BYTES + 4 * _RECORD

# Decrypted records land in one scratch buffer per thread before being
# copied out as a single chunk; nothing awaits while it is in use.
_local = threading.local()


def _scratch() -> bytearray:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(_SCRATCH)
    return buf


class TlsStream:
    """One TLS connection over ``sock`` (a ``trio.SocketStream``), client
    or server side per ``server_side``. See the module docstring."""

    def __init__(self, sock: trio.SocketStream, context: ssl.SSLContext, *,
                 server_side: bool):
        self.transport_stream = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=None)
        self._handshaken = False
        self._broken = False
        self._closed = False

    # -- handshake ------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake to its end. BrokenResourceError if it fails
        or the peer goes away meanwhile."""
        while True:
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except (ssl.SSLError, ssl.CertificateError) as e:
                self._broken = True
                raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from e
            await self._flush()
            if done:
                self._handshaken = True
                return
            await self._fill()

    def getpeercert(self, binary_form: bool = False):
        return self._ssl.getpeercert(binary_form)

    # -- data -------------------------------------------------------------------

    async def receive_some(self) -> bytes:
        """The plaintext of every whole record received so far (waiting for
        at least one), or ``b""`` once the peer has sent close_notify."""
        self._check()
        while True:
            data = self._decrypt_buffered()
            if data is not None:
                return data
            await self._fill()

    async def send_all(self, *chunks: bytes | bytearray | memoryview) -> None:
        """Encrypt each chunk (in order) and send them, with anything else
        waiting in the outgoing BIO, in one socket send. With no chunk (or
        empty ones) this only flushes that. A cancelled send leaves the
        stream broken (part of a record may have gone out)."""
        self._check()
        try:
            for data in chunks:
                if data:   # SSLObject takes write(b"") for an end of stream
                    self._ssl.write(data)   # a memory BIO takes all of it
        except ssl.SSLError as e:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS write failed: {e}") from e
        await self._flush()

    @property
    def output_pending(self) -> bool:
        """OpenSSL has bytes to send that no ``send_all`` has taken yet."""
        return self._out.pending > 0

    # -- closing ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send close_notify (best effort, not waiting for the peer's), then
        close the socket. Idempotent; a cancelled close still closes."""
        try:
            if not self._closed and self._handshaken and not self._broken:
                self._closed = True
                try:
                    self._ssl.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLError):
                    pass   # want-read: the peer's close_notify, not waited for
                out = self._out.read()
                if out:
                    try:
                        await self.transport_stream.send_all(out)
                    except (trio.BrokenResourceError, trio.ClosedResourceError,
                            trio.BusyResourceError):
                        pass   # the peer closed first: legal, nothing to report
        finally:
            self._closed = True
            await trio.aclose_forcefully(self.transport_stream)

    # -- internals ------------------------------------------------------------------

    def _check(self) -> None:
        if self._broken:
            raise trio.BrokenResourceError("TLS stream broken earlier")
        if self._closed:
            raise trio.ClosedResourceError("TLS stream closed")

    async def _fill(self) -> None:
        """Read once from the socket into the incoming BIO (EOF included). A
        cancelled read takes nothing from the socket: the stream stays whole."""
        data = await self.transport_stream.receive_some(RECV_BYTES)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()   # OpenSSL then reports a ragged or clean end

    async def _flush(self) -> None:
        out = self._out.read()
        if out:
            try:
                sent = self._send_now(out) if self._handshaken else 0
                if sent < len(out):
                    await self.transport_stream.send_all(memoryview(out)[sent:])
            except BaseException:
                self._broken = True
                raise

    def _send_now(self, out: bytes) -> int:
        """Write what the socket takes at once, without a trip through the
        scheduler (a small frame on an idle connection: all of it). trio's
        ``send_all`` yields after every send even when nothing had to wait,
        which on a request-answer path is a task step per frame at each end.
        The rest, if any, goes through ``send_all`` (waiting for room). Only
        for a socket stream; the callers checkpoint elsewhere (they wait for
        the answer, or end)."""
        stream = self.transport_stream
        if type(stream) is not trio.SocketStream:
            return 0
        fd = stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            return os.write(fd, out)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise trio.BrokenResourceError(f"socket send failed: {e}") from e

    def _decrypt_buffered(self) -> bytes | None:
        """Every whole record in the incoming BIO, decrypted and joined; b""
        after close_notify; None when a socket read is needed first."""
        buf = _scratch()
        got = 0
        closed = False
        with memoryview(buf) as mv:
            try:
                while got + _RECORD <= len(buf):
                    n = self._ssl.read(_RECORD, mv[got:got + _RECORD])
                    if not n:   # close_notify received
                        closed = True
                        break
                    got += n
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                self._broken = True
                raise trio.BrokenResourceError(f"TLS record refused: {e}") from e
            if got:
                return mv[:got].tobytes()
        return b"" if closed else None
