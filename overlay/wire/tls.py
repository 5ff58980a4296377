"""The real transport: TCP + TLS 1.3, peers authenticated by NodeID
(DESIGN.md, Wire; the ``Transport`` contract is in ``transport.py``).

Connections. A connection is one-way: the side that connected sends
requests, the side that accepted answers them. Setting one up is TCP, the
TLS 1.3 handshake (the client checks that the server's certificate key hashes
to the NodeID it asked for, ``certs.py``), then the client's NodeID proof
(``handshake.py``). From then on the server passes the proven NodeID to its
handler as ``sender`` for every request on that connection. TLS itself is
``tls_stream.TlsStream`` (why not ``trio.SSLStream``: there), which relies
on the one-reader, one-writer discipline described below.

Client side. One connection per peer NodeID, reused by all requests; the
first requests to a peer share one connect. Requests carry ids and are
multiplexed; one reader task per connection hands each reply to its waiting
caller. At most ``max_inflight_per_peer`` requests are in flight to one peer
(the others wait for a slot, inside their timeout). Every request runs under
its own timeout (``RequestTimeout``).

Why a writer task per connection: a TLS stream whose ``send_all`` is
cancelled half-way is broken for good. Callers therefore only put whole
frames on a bounded queue; the connection's writer task sends them (in
batches when several are waiting). A caller that is cancelled or times out
loses only its own answer, never the connection; a late reply is dropped.

Server side. Each accepted connection runs its handlers concurrently, at
most ``max_handlers_per_conn`` at a time; past that the reader stops reading,
which pushes back on the client through TCP. One-way frames (request id 0,
``Transport.send``) are handled by the reader itself, in order, with no
task and no reply: the cheapest path for a message. Replies and refusals are
built by ``transport.answer`` so they look exactly as in the simulator.

Bad peers. Any bad frame (``FrameError``: oversized, truncated, not msgpack,
unknown type, wrong field types, a reply where a request belongs, ...) or a
failed proof closes that connection with a WARNING naming the peer and the
reason; nothing else is disturbed. Requests pending on a connection that dies
fail with ``PeerProtocolError`` (the peer sent garbage) or ``PeerUnreachable``
(it went away); a server whose key does not match gives ``PeerAuthError``.

Idle connections are closed by the client after ``idle_timeout`` seconds
without traffic, and by the server after four times that, so that normally the
client, who knows whether it is about to send, closes first.

Where tasks live. ``serve()`` opens one nursery for the listener, accepted
connections and, unless the transport is used as ``async with transport:``,
the client connections too. A transport that never serves (a tool that only
asks questions) must be entered with ``async with``; ``request()`` on a
transport that has neither raises RuntimeError. ``aclose()`` closes all
connections and stops ``serve()``.

Not yet: a cap on the number of connections. A flood of connections that
never authenticate is bounded only by ``handshake_timeout`` each.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque

import trio

from . import certs, frames, handshake
from .frames import Frame, FrameBuffer, FrameError, Kind
from .ids import Identity, short
from .tls_stream import TlsStream
from .transport import (
    DEFAULT_TIMEOUT,
    ONE_WAY_ID,
    Handler,
    Peer,
    PeerAuthError,
    PeerError,
    PeerProtocolError,
    PeerUnreachable,
    Quick,
    RequestTimeout,
    Transport,
    answer,
    consume,
    reply_body,
)

log = logging.getLogger(__name__)

WRITE_BATCH_BYTES = 4 << 20     # queued frames taken into one send up to this
JOIN_BYTES = 64 * 1024          # a batch smaller than this is joined into one write
INLINE_BYTES = 64 * 1024        # a frame this small may be sent by its own task (_Link.send)
CLOSE_GRACE = 1.0               # seconds to send close_notify before dropping TCP


def parse_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as (host, port); ValueError if not.
    Port 0 passes (it means "any free port" to a listener; nobody can be
    reached there, which connecting reports)."""
    host, sep, port_s = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise ValueError(f"not a host:port address: {addr!r}")
    return host, int(port_s)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Link:
    """A TLS stream carrying frames: the reading half splits and decodes, the
    writing half is a bounded queue drained by the connection's writer task
    (``tls_stream``). A small frame finding nothing queued and nothing being
    sent goes out from its own task instead (:meth:`send`): waking the writer
    is a task switch per frame, which on a busy ring member was a good part
    of its CPU. ``_sending`` keeps the two kinds of sender in order."""

    def __init__(self, stream: TlsStream, max_frame: int, queue: int, stats):
        self.stream = stream
        self.established = False   # TLS done: a graceful close is possible
        self.stats = stats
        self._buf = FrameBuffer(max_frame)
        self._payloads: deque[bytes] = deque()
        # Items: a whole frame, or a frame in parts (frames.encode_parts).
        self.out_send, self.out_recv = trio.open_memory_channel[bytes | tuple[bytes, ...]](queue)
        self._sending = trio.Lock()     # held by whoever is writing to the stream
        self._queued = 0                # frames given to the writer and not yet sent
        self.last_active = trio.current_time()

    async def recv(self) -> Frame | None:
        """The next frame, or None when the peer ended the stream cleanly.
        FrameError for a bad frame, including a stream that ends inside one;
        trio.BrokenResourceError when the connection is lost."""
        while not self._payloads:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                if self._buf.pending:
                    raise FrameError(
                        f"truncated frame: connection lost {self._buf.pending} bytes into it"
                    ) from None
                raise
            if not data:
                if self._buf.pending:
                    raise FrameError(
                        f"truncated frame: stream ended {self._buf.pending} bytes into it")
                return None
            self.stats.bytes_received += len(data)
            self.last_active = trio.current_time()
            self._payloads.extend(self._buf.feed(data))
            if self.stream.output_pending:
                self._nudge_writer()
        return frames.decode(self._payloads.popleft())

    def _nudge_writer(self) -> None:
        """Reading made TLS output (a post-handshake message): have the
        writer send it (an empty item flushes; a full queue will anyway)."""
        try:
            self.out_send.send_nowait(b"")
            self._queued += 1
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def recv_handshake(self, step: str) -> Frame:
        frame = await self.recv()
        if frame is None:
            raise PeerUnreachable(f"connection closed during the handshake ({step})")
        return frame

    async def send_direct(self, data: bytes) -> None:
        """Send before the writer task runs (handshake only)."""
        await self.stream.send_all(data)
        self.stats.bytes_sent += len(data)

    @property
    def idle(self) -> bool:
        """Nothing queued or being written: a small frame goes out at once."""
        return not self._queued and not self._sending.locked() and self.established

    async def send(self, item: bytes | tuple[bytes, ...]) -> None:
        """Send one frame (bytes, or parts from ``frames.encode_parts``) after
        everything sent before it. Inline when it is small and the stream is
        idle, shielded so that a caller's timeout never cuts a TLS record
        short (a connection that dies closes the socket, which ends the
        send); else through the writer's queue (back-pressure: waits while
        it is full)."""
        if not self._queued and not self._sending.locked() and self.established:
            parts = item if type(item) is tuple else (item,)
            size = sum(len(x) for x in parts)
            if size <= INLINE_BYTES:
                self._sending.acquire_nowait()
                try:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(*parts)
                finally:
                    self._sending.release()
                self.stats.bytes_sent += size
                self.last_active = trio.current_time()
                return
        self._queued += 1      # counted from here: a frame in hand-over is not in the buffer
        try:
            await self.out_send.send(item)
        except BaseException:
            self._queued -= 1
            raise

    async def write_loop(self) -> None:
        async for item in self.out_recv:
            await self._sending.acquire()
            try:
                await self._write_batch(item)
            finally:
                self._sending.release()

    async def _write_batch(self, item: bytes | tuple[bytes, ...]) -> None:
        batch: list[bytes] = []
        size = 0
        taken = 1
        while True:
            if type(item) is tuple:
                batch += item
                size += sum(len(x) for x in item)
            else:
                batch.append(item)
                size += len(item)
            if size >= WRITE_BATCH_BYTES:
                break
            try:
                item = self.out_recv.receive_nowait()
                taken += 1
            except trio.WouldBlock:
                break
        # Everything queued goes out in one socket send; small frames are
        # joined first so that they share TLS records.
        if size < JOIN_BYTES and len(batch) > 1:
            batch = [b"".join(batch)]
        try:
            await self.stream.send_all(*batch)
        finally:
            self._queued -= taken
        self.stats.bytes_sent += size
        self.last_active = trio.current_time()

    async def close(self) -> None:
        if self.established:
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                await self.stream.aclose()
        # Not established, or the graceful close was cut short: just drop it.
        await trio.aclose_forcefully(self.stream)


class _Conn:
    """One connection's lifetime: a cancel scope over all its tasks and the
    first reason it ended for (the PeerError class its waiters get)."""

    def __init__(self, label: str):
        self.label = label
        self.scope = trio.CancelScope()
        self.link: _Link | None = None
        self.failure: tuple[type[PeerError], str] | None = None
        self.peer_id: bytes | None = None
        self.done = trio.Event()  # all its tasks finished and its socket closed

    def end(self, cls: type[PeerError], reason: str, level: int = logging.DEBUG) -> None:
        """Close the connection (idempotent: the first reason sticks)."""
        if self.failure is not None:
            return
        self.failure = (cls, reason)
        log.log(level, "closing connection %s: %s", self.label, reason)
        self.scope.cancel()
        if self.link is not None:
            self.link.out_recv.close()  # wakes callers blocked on a full queue
        self._ended()

    def _ended(self) -> None:
        pass

    def raise_failure(self) -> None:
        if self.failure is not None:
            cls, reason = self.failure
            raise cls(f"{self.label}: {reason}", self.peer_id)


class _Pending:
    __slots__ = ("msg_type", "event", "frame")

    def __init__(self, msg_type: str):
        self.msg_type = msg_type
        self.event = trio.Event()
        self.frame: Frame | None = None


class _ClientConn(_Conn):
    def __init__(self, transport: "TlsTransport", peer: Peer):
        super().__init__(f"to {short(peer.id)}@{peer.addr}")
        self.transport = transport
        self.peer = peer
        self.peer_id = peer.id
        self.ready = trio.Event()
        self.pending: dict[int, _Pending] = {}
        self.next_id = 1
        self.users = 0  # requests holding this connection; idle close waits for 0
        self.slots = trio.Semaphore(transport.max_inflight_per_peer)

    def _ended(self) -> None:
        pool = self.transport._conns
        if pool.get(self.peer.id) is self:
            del pool[self.peer.id]
        self.ready.set()
        for slot in self.pending.values():
            slot.event.set()  # frame None: the waiter raises our failure
        self.pending.clear()


async def _guarded(conn: _Conn, fn, *args) -> None:
    """Run one of a connection's tasks; whatever goes wrong ends that
    connection (with the reason logged) and nothing else."""
    try:
        await fn(*args)
    except FrameError as e:
        conn.end(PeerProtocolError, f"bad frame: {e}", logging.WARNING)
    except (PeerAuthError, PeerProtocolError) as e:
        conn.end(type(e), str(e), logging.WARNING)
    except PeerError as e:
        conn.end(type(e), str(e))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        conn.end(PeerUnreachable, f"connection lost ({type(e).__name__})")
    except Exception:
        # A bug of ours: loud, but confined to this connection.
        log.exception("connection %s failed", conn.label)
        conn.end(PeerUnreachable, "internal error")


class TlsTransport(Transport):
    """TCP + TLS 1.3 transport of one node (see module docstring)."""

    def __init__(self, identity: Identity, listen: tuple[str, int] = ("127.0.0.1", 0), *,
                 advertise: str | None = None,
                 max_frame: int = frames.DEFAULT_MAX_FRAME,
                 max_inflight_per_peer: int = 64,
                 max_handlers_per_conn: int = 64,
                 connect_timeout: float = 10.0,
                 handshake_timeout: float = 10.0,
                 idle_timeout: float = 120.0):
        super().__init__(identity)
        self.listen = listen
        self.advertise = advertise
        self.max_frame = max_frame
        self.max_inflight_per_peer = max_inflight_per_peer
        self.max_handlers_per_conn = max_handlers_per_conn
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._server_ctx = certs.server_context(identity)
        self._client_ctx = certs.client_context()
        self._address: str | None = None
        self._handler: Handler | None = None
        self._inline: Quick | None = None
        self._home: trio.Nursery | None = None   # where client connections run
        self._serve_scope: trio.CancelScope | None = None
        self._serve_done: trio.Event | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._conns: dict[bytes, _ClientConn] = {}
        self._accepted: set[_Conn] = set()
        self.connections_opened = 0    # outgoing, authenticated, ever
        self.connections_accepted = 0  # incoming, authenticated, ever

    @property
    def address(self) -> str | None:
        return self._address

    def connection_count(self) -> tuple[int, int]:
        """(outgoing, incoming) open connections, for tests and ``inspect``."""
        return len(self._conns), len(self._accepted)

    # -- lifetime ---------------------------------------------------------------

    async def __aenter__(self) -> "TlsTransport":
        """A home for client connections without (or before) serving."""
        if self._home is not None:
            raise RuntimeError("enter `async with transport` before serve(), and only once")
        stack = contextlib.AsyncExitStack()
        self._home = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        return self

    async def __aexit__(self, *exc) -> bool | None:
        stack, self._stack = self._stack, None
        try:
            await self.aclose()
        finally:
            self._home = None
        return await stack.__aexit__(*exc)

    async def serve(self, handler: Handler, *, inline: Quick | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self._serve_scope is not None:
            raise RuntimeError("this transport is already serving")
        host, port = self.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        self._handler = handler
        self._inline = inline
        own_home = self._home is None
        self._serve_done = done = trio.Event()
        try:
            with trio.CancelScope() as self._serve_scope:
                async with trio.open_nursery() as nursery:
                    if own_home:
                        self._home = nursery
                    await nursery.start(trio.serve_listeners, self._accept, listeners)
                    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
                    self._address = self.advertise or format_address(bound_host, bound_port)
                    log.info("node %s serving on %s", short(self.id), self._address)
                    task_status.started(self._address)
        finally:
            self._serve_scope = None
            self._address = None
            if own_home:
                self._home = None
            done.set()

    async def aclose(self) -> None:
        """Close every connection, both ways, stop serving, and return once
        all of it is done. Safe to call more than once, from anywhere."""
        conns = list(self._conns.values()) + list(self._accepted)
        for conn in conns:
            conn.end(PeerUnreachable, "transport closed")
        if self._serve_scope is not None:
            self._serve_scope.cancel()
        for conn in conns:
            await conn.done.wait()
        if self._serve_done is not None:
            await self._serve_done.wait()
        await trio.lowlevel.checkpoint()

    # -- client side --------------------------------------------------------------

    async def request(self, peer: Peer, msg_type: str, body: dict, *,
                      timeout: float = DEFAULT_TIMEOUT) -> dict:
        self._outgoing(msg_type, "request")
        return await self._counted(self._request, peer, msg_type, body, timeout,
                                   "no answer to {t} from {p}")

    async def _counted(self, fn, peer: Peer, msg_type: str, body: dict,
                       timeout: float | None, late: str):
        """``fn(peer, msg_type, body)``, given ``timeout`` seconds (None: no
        scope) after which RequestTimeout says ``late`` (a template of the
        message type and peer); every PeerError is counted in the stats."""
        try:
            if timeout is None:
                return await fn(peer, msg_type, body)
            with trio.move_on_after(timeout):
                return await fn(peer, msg_type, body)
            raise RequestTimeout(
                f"{late.format(t=msg_type, p=short(peer.id))} within {timeout:g}s", peer.id)
        except PeerError as e:
            self.stats.errors[type(e).__name__] += 1
            raise

    def _outgoing(self, msg_type: str, how: str) -> None:
        """Checks and accounting shared by ``request`` and ``send``."""
        if msg_type.startswith(handshake.RESERVED_PREFIX):
            raise ValueError(f"{msg_type} is a handshake message, not a request")
        if self._home is None:
            raise RuntimeError(f"TlsTransport.{how}() needs serve() running "
                               "or `async with transport`")
        self.stats.sent[msg_type] += 1

    def _conn_to(self, peer: Peer) -> _ClientConn:
        """The connection to ``peer``, started if there is none."""
        conn = self._conns.get(peer.id)
        if conn is None:
            conn = _ClientConn(self, peer)
            try:
                self._home.start_soon(self._run_client, conn)
            except RuntimeError:  # the home nursery is closing
                raise PeerUnreachable("transport is shutting down", peer.id) from None
            self._conns[peer.id] = conn
        return conn

    async def send(self, peer: Peer, msg_type: str, body: dict, *,
                   timeout: float = DEFAULT_TIMEOUT) -> None:
        """One-way (``Transport.send``): the frame goes on the connection
        (written at once when the stream is idle, else queued for its
        writer) and nothing waits for an answer."""
        self._outgoing(msg_type, "send")
        conn = self._conns.get(peer.id)
        if (conn is not None and conn.ready.is_set() and conn.failure is None
                and conn.link.idle):
            # The common case: the frame will be written at once (_Link.send),
            # which no timeout could interrupt anyway; skip the timeout scope.
            timeout = None
        return await self._counted(self._send, peer, msg_type, body, timeout,
                                   "{t} to {p} not sent")

    async def _send(self, peer: Peer, msg_type: str, body: dict) -> None:
        data = frames.encode_parts(Kind.REQUEST, msg_type, ONE_WAY_ID, body,
                                   max_frame=self.max_frame)
        conn = self._conn_to(peer)
        conn.users += 1
        try:
            if not conn.ready.is_set():   # (waiting on a set Event still yields)
                await conn.ready.wait()
            conn.raise_failure()
            try:
                await conn.link.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.raise_failure()
                raise PeerUnreachable(f"{conn.label}: connection closed", peer.id) from None
        finally:
            conn.users -= 1

    async def _request(self, peer: Peer, msg_type: str, body: dict) -> dict:
        conn = self._conn_to(peer)
        conn.users += 1
        try:
            if not conn.ready.is_set():   # (waiting on a set Event, or acquiring a
                await conn.ready.wait()   # free slot, still yields: a task step)
            conn.raise_failure()
            try:
                conn.slots.acquire_nowait()
            except trio.WouldBlock:
                await conn.slots.acquire()
            try:
                conn.raise_failure()
                req_id = conn.next_id
                conn.next_id += 1
                data = frames.encode_parts(Kind.REQUEST, msg_type, req_id, body,
                                           max_frame=self.max_frame)
                slot = conn.pending[req_id] = _Pending(msg_type)
                try:
                    await conn.link.send(data)
                    await slot.event.wait()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the connection ended; its failure says why
                finally:
                    conn.pending.pop(req_id, None)
                if slot.frame is None:
                    conn.raise_failure()
                    raise PeerUnreachable(f"{conn.label}: connection closed", peer.id)
                return reply_body(slot.frame, peer.id)
            finally:
                conn.slots.release()
        finally:
            conn.users -= 1

    async def _run_client(self, conn: _ClientConn) -> None:
        try:
            with conn.scope:
                await _guarded(conn, self._client_session, conn)
        finally:
            await self._finish(conn)

    @staticmethod
    async def _finish(conn: _Conn) -> None:
        try:
            conn.end(PeerUnreachable, "connection closed")
            if conn.link is not None:
                await conn.link.close()
        finally:
            # In a cancelled context the close's last checkpoint raises
            # Cancelled; done must be set all the same.
            conn.done.set()

    async def _client_session(self, conn: _ClientConn) -> None:
        try:
            with trio.fail_after(self.connect_timeout):
                await self._connect(conn)
        except trio.TooSlowError:
            raise PeerUnreachable(f"connect timed out after {self.connect_timeout:g}s") from None
        self.connections_opened += 1
        conn.ready.set()
        log.debug("connected %s", conn.label)
        async with trio.open_nursery() as n:
            n.start_soon(_guarded, conn, conn.link.write_loop)
            n.start_soon(_guarded, conn, self._client_idle, conn)
            await _guarded(conn, self._client_reader, conn)

    async def _connect(self, conn: _ClientConn) -> None:
        peer = conn.peer
        try:
            host, port = parse_address(peer.addr)
        except ValueError as e:
            raise PeerUnreachable(str(e)) from None
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise PeerUnreachable(f"cannot connect: {e.strerror or e}") from None
        stream = TlsStream(tcp, self._client_ctx, server_side=False)
        link = conn.link = _Link(stream, self.max_frame, self.max_inflight_per_peer, self.stats)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            raise PeerUnreachable(f"TLS handshake failed: {e.__cause__ or e}") from None
        link.established = True
        certs.check_server_certificate(stream.getpeercert(binary_form=True), peer.id)
        nonce = handshake.read_hello(await link.recv_handshake("hello"), peer.id)
        await link.send_direct(handshake.proof_frame(self.identity, peer.id, nonce))
        handshake.read_verdict(await link.recv_handshake("verdict"), self.id, peer.id)

    async def _client_reader(self, conn: _ClientConn) -> None:
        link = conn.link
        while True:
            frame = await link.recv()
            if frame is None:
                conn.end(PeerUnreachable, "peer closed the connection")
                return
            if frame.kind == Kind.REQUEST:
                raise PeerProtocolError(f"server sent a {frame.type} request")
            if not 0 < frame.id < conn.next_id:
                raise PeerProtocolError(f"reply to request id {frame.id}, never sent")
            slot = conn.pending.get(frame.id)
            if slot is None:
                continue  # its caller timed out or was cancelled
            if frame.type != slot.msg_type:
                raise PeerProtocolError(f"{frame.type} reply to a {slot.msg_type} request")
            del conn.pending[frame.id]
            slot.frame = frame
            slot.event.set()

    async def _client_idle(self, conn: _ClientConn) -> None:
        link = conn.link
        while True:
            await trio.sleep_until(link.last_active + self.idle_timeout)
            if trio.current_time() < link.last_active + self.idle_timeout:
                continue
            if conn.users == 0:
                conn.end(PeerUnreachable, "idle")
                return
            await trio.sleep(self.idle_timeout)  # a slow request is not idleness

    # -- server side ----------------------------------------------------------------

    async def _accept(self, tcp: trio.SocketStream) -> None:
        try:
            remote = format_address(*tcp.socket.getpeername()[:2])
        except OSError:
            remote = "?"
        conn = _Conn(f"from ?@{remote}")
        self._accepted.add(conn)
        try:
            with conn.scope:
                await _guarded(conn, self._server_session, conn, tcp, remote)
        finally:
            self._accepted.discard(conn)
            await self._finish(conn)

    async def _server_session(self, conn: _Conn, tcp: trio.SocketStream, remote: str) -> None:
        stream = TlsStream(tcp, self._server_ctx, server_side=True)
        link = conn.link = _Link(stream, self.max_frame, self.max_handlers_per_conn, self.stats)
        try:
            with trio.fail_after(self.handshake_timeout):
                client = await self._prove_client(link)
        except trio.TooSlowError:
            raise PeerUnreachable(
                f"handshake timed out after {self.handshake_timeout:g}s") from None
        conn.peer_id = client
        conn.label = f"from {short(client)}@{remote}"
        self.connections_accepted += 1
        log.debug("accepted %s", conn.label)
        handlers = trio.Semaphore(self.max_handlers_per_conn)
        async with trio.open_nursery() as n:
            n.start_soon(_guarded, conn, link.write_loop)
            n.start_soon(_guarded, conn, self._server_idle, conn, handlers)
            await _guarded(conn, self._server_reader, conn, client, handlers, n)

    async def _prove_client(self, link: _Link) -> bytes:
        try:
            await link.stream.do_handshake()
        except trio.BrokenResourceError as e:
            raise PeerUnreachable(f"TLS handshake failed: {e.__cause__ or e}") from None
        link.established = True
        nonce = handshake.new_nonce()
        await link.send_direct(handshake.hello_frame(self.identity, nonce))
        frame = await link.recv_handshake("proof")
        try:
            client = handshake.check_proof(frame, self.id, nonce)
        except PeerAuthError as e:
            # Tell the client why before closing: an honest one with a bug
            # sees "auth" instead of a bare reset.
            with contextlib.suppress(trio.BrokenResourceError):
                await link.send_direct(handshake.refusal_frame(str(e)))
            raise
        await link.send_direct(handshake.ready_frame(client))
        return client

    async def _server_reader(self, conn: _Conn, client: bytes,
                             handlers: trio.Semaphore, nursery: trio.Nursery) -> None:
        link = conn.link
        while True:
            frame = await link.recv()
            if frame is None:
                conn.end(PeerUnreachable, "client closed the connection")
                return
            if frame.kind != Kind.REQUEST:
                raise PeerProtocolError(f"client sent a {frame.kind.name}, not a request")
            if frame.type.startswith(handshake.RESERVED_PREFIX):
                raise PeerProtocolError(f"{frame.type} after the handshake")
            if frame.id == ONE_WAY_ID:
                # One-way: handled right here, in order; reading waits for
                # it, which is the back-pressure (module docstring).
                self.stats.received[frame.type] += 1
                await consume(self._handler, client, frame)
                continue
            try:
                handlers.acquire_nowait()   # no task step when a handler is free
            except trio.WouldBlock:
                await handlers.acquire()    # back-pressure: stop reading while saturated
            self.stats.received[frame.type] += 1
            if self._inline is not None and self._inline(frame.type, frame.body):
                # A quick one (a small staged put): answered from here, which
                # spares a task and a scheduler pass per request.
                await self._handle(link, client, frame, handlers)
                continue
            nursery.start_soon(_guarded, conn, self._handle, link, client, frame, handlers)

    async def _handle(self, link: _Link, client: bytes, frame: Frame,
                      handlers: trio.Semaphore) -> None:
        try:
            data = await answer(self._handler, client, frame, self.max_frame)
            await link.send(data)
        finally:
            handlers.release()

    async def _server_idle(self, conn: _Conn, handlers: trio.Semaphore) -> None:
        link, limit = conn.link, 4 * self.idle_timeout
        while True:
            await trio.sleep_until(link.last_active + limit)
            if trio.current_time() < link.last_active + limit:
                continue
            if handlers.value == self.max_handlers_per_conn:
                conn.end(PeerUnreachable, "idle")
                return
            await trio.sleep(limit)
