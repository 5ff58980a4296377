"""The transport interface that all node code talks through.

A transport carries request/response exchanges between authenticated nodes.
Two implementations behave the same as seen from above:

* ``overlay.wire.tls.TlsTransport``: TCP with TLS 1.3, one reused connection
  per peer, requests multiplexed by id;
* ``overlay.wire.simnet.SimTransport``: an in-process network on virtual time
  with per-link latency, loss, partitions and crashes.

Both encode and decode every message with ``frames`` (so schemas are checked
the same way in simulation as on the wire), and both dispatch incoming
requests to one :data:`Handler`. A handler answers with a reply body, or raises
:class:`Refused` to send a coded refusal that the caller receives as
:class:`RemoteError`. Any other exception in a handler is a bug: it is logged
with its traceback and the caller gets ``RemoteError("internal", ...)``.

Errors a caller of :meth:`Transport.request` can see, by whose fault:

* :class:`PeerUnreachable`: no connection (refused, reset, node down, link cut);
* :class:`RequestTimeout`: no answer within the timeout;
* :class:`PeerAuthError`: the peer could not prove the NodeID we expected;
* :class:`PeerProtocolError`: the peer sent bytes that are not a valid frame;
* :class:`RemoteError`: the peer answered with a refusal (code + message).

The first four share the base :class:`PeerError` ("this peer did not give a
usable answer; try another"), which is what routing code usually catches.

One-way messages (:meth:`Transport.send`). Protocols whose messages need no
answer (PBFT's are one-way) would otherwise pay for a reply frame and a
waiting task per message. ``send`` hands a request frame with id 0 to the
connection and returns; the receiver runs the handler for it (see
:func:`consume`) and sends nothing back. Nothing is confirmed: a message may
be lost (the connection dies, the peer is down or partitioned) and, on the
simulated network, messages may arrive out of order; the sender learns only
of failures it sees at once (no connection to be had: ``PeerError``). On TLS
the receiver runs a one-way handler in the connection's reading task, one
frame at a time in the order sent: the handler must not block for long
(it holds up that connection's later frames).
"""

from __future__ import annotations

import abc
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from . import frames
from .ids import short

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
ONE_WAY_ID = 0          # the request id of a one-way frame (requests count from 1)


class WireError(Exception):
    """Base of the wire layer's errors."""


class PeerError(WireError):
    """A peer gave no usable answer. ``peer_id`` names it when known."""

    def __init__(self, msg: str, peer_id: bytes | None = None):
        super().__init__(msg)
        self.peer_id = peer_id


class PeerUnreachable(PeerError):
    """No connection to the peer: refused, reset, crashed, or link cut."""


class RequestTimeout(PeerError):
    """The peer did not answer within the request's timeout."""


class PeerAuthError(PeerError):
    """The peer could not prove the NodeID we expected (key mismatch, bad
    proof, replayed or relayed proof). Logged as a security event."""


class PeerProtocolError(PeerError):
    """The peer sent a malformed frame; the connection was closed."""


class RemoteError(WireError):
    """The peer refused the request with a code (e.g. ``"not_found"``)."""

    def __init__(self, code: str, msg: str, peer_id: bytes | None = None):
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.peer_id = peer_id


class Refused(Exception):
    """Raised by a request handler to refuse with a code and a message."""

    def __init__(self, code: str, msg: str = ""):
        super().__init__(f"{code}: {msg}")
        self.code = code[:64]
        self.msg = msg[:2048]


@dataclass(frozen=True, slots=True)
class Peer:
    """How to reach a node: its NodeID and its transport address."""

    id: bytes
    addr: str

    def __repr__(self) -> str:
        return f"Peer({short(self.id)}@{self.addr})"


# handler(sender NodeID, message type, request body) -> reply body
Handler = Callable[[bytes, str, dict], Awaitable[dict]]
# (message type, body) -> whether the handler answers it without waiting on
# the network, a thread or a timer (Transport.serve's ``inline``).
Quick = Callable[[str, dict], bool]


@dataclass
class TransportStats:
    """Counters of one transport, for benchmarks and ``inspect``."""

    sent: Counter = field(default_factory=Counter)        # requests sent, by type
    received: Counter = field(default_factory=Counter)    # requests handled, by type
    bytes_sent: int = 0
    bytes_received: int = 0
    errors: Counter = field(default_factory=Counter)      # by error class name

    def total_sent(self) -> int:
        return sum(self.sent.values())


class Transport(abc.ABC):
    """One node's endpoint on a network."""

    def __init__(self, identity):
        self.identity = identity
        self.stats = TransportStats()

    @property
    def id(self) -> bytes:
        return self.identity.id

    @property
    @abc.abstractmethod
    def address(self) -> str | None:
        """This node's address once :meth:`serve` has started, else None."""

    @property
    def peer(self) -> Peer:
        """This node as others reach it."""
        if self.address is None:
            raise RuntimeError("transport is not serving yet")
        return Peer(self.id, self.address)

    @abc.abstractmethod
    async def serve(self, handler: Handler, *, inline: Quick | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept requests and pass them to ``handler`` until cancelled.
        Calls ``task_status.started(address)`` once reachable. A request
        ``inline`` says yes to may be handled by the task that read it, in
        order, instead of a task of its own (a transport may ignore it)."""

    @abc.abstractmethod
    async def request(self, peer: Peer, msg_type: str, body: dict, *,
                      timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Send a request and return the peer's reply body.
        Raises PeerError subclasses or RemoteError (see module docstring)."""

    async def send(self, peer: Peer, msg_type: str, body: dict, *,
                   timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send a one-way message (module docstring): return once it is on
        its way, with no answer. Raises PeerError if there is no connection
        to the peer or the message could not be handed over within
        ``timeout``; ValueError for a body its schema refuses (our bug). This
        fallback sends a request and waits for its reply; both transports
        override it with a real one-way frame."""
        try:
            await self.request(peer, msg_type, body, timeout=timeout)
        except RemoteError:
            pass

    async def aclose(self) -> None:
        """Drop cached connections. Safe to call more than once."""


class Dispatcher:
    """A Handler that routes each message type to its own function, so that
    several services (overlay, block store, inner ring) share one node."""

    def __init__(self):
        self._routes: dict[str, Callable[[bytes, dict], Awaitable[dict]]] = {}
        self._quick: dict[str, Callable[[dict], bool]] = {}

    def on(self, msg_type: str, fn: Callable[[bytes, dict], Awaitable[dict]], *,
           quick: Callable[[dict], bool] | None = None) -> None:
        """Route ``msg_type`` to ``fn``. ``quick(body)``: whether ``fn``
        answers that body without waiting on the network, a thread or a
        timer (then the transport may run it in its reading task)."""
        if msg_type not in frames.REGISTRY:
            raise ValueError(f"message type {msg_type!r} has no registered schema")
        if msg_type in self._routes:
            raise ValueError(f"message type {msg_type!r} already has a handler")
        self._routes[msg_type] = fn
        if quick is not None:
            self._quick[msg_type] = quick

    def quick(self, msg_type: str, body: dict) -> bool:
        """The ``inline`` test for Transport.serve."""
        q = self._quick.get(msg_type)
        return q is not None and q(body)

    def handles(self, msg_type: str) -> bool:
        return msg_type in self._routes

    async def __call__(self, sender: bytes, msg_type: str, body: dict) -> dict:
        fn = self._routes.get(msg_type)
        if fn is None:
            raise Refused("unsupported", f"this node does not serve {msg_type}")
        return await fn(sender, body)


async def answer(handler: Handler, sender: bytes, frame: frames.Frame,
                 max_frame: int = frames.DEFAULT_MAX_FRAME) -> bytes:
    """Run ``handler`` on a decoded request frame; return the encoded reply
    or error frame. Shared by both transports so they refuse alike."""
    try:
        reply = await handler(sender, frame.type, frame.body)
        return frames.encode(frames.Kind.REPLY, frame.type, frame.id, reply, max_frame=max_frame)
    except Refused as e:
        return frames.encode(frames.Kind.ERROR, frame.type, frame.id,
                             {"code": e.code, "msg": e.msg}, max_frame=max_frame)
    except trio.Cancelled:
        raise
    except Exception as e:
        log.exception("handler for %s from %s failed", frame.type, short(sender))
        return frames.encode(frames.Kind.ERROR, frame.type, frame.id,
                             {"code": "internal", "msg": f"{type(e).__name__}"},
                             max_frame=max_frame)


async def consume(handler: Handler, sender: bytes, frame: frames.Frame) -> None:
    """Run ``handler`` on a one-way frame (request id 0): nothing goes back,
    so a refusal is only logged (at DEBUG: the sender's business), and a
    handler bug is logged with its traceback like in :func:`answer`. Shared
    by both transports."""
    try:
        await handler(sender, frame.type, frame.body)
    except Refused as e:
        log.debug("one-way %s from %s refused: %s", frame.type, short(sender), e)
    except trio.Cancelled:
        raise
    except Exception:
        log.exception("handler for one-way %s from %s failed", frame.type, short(sender))


def reply_body(frame: frames.Frame, peer_id: bytes) -> dict:
    """The body of a reply frame, or the RemoteError an error frame carries."""
    if frame.kind == frames.Kind.ERROR:
        raise RemoteError(frame.body["code"], frame.body["msg"], peer_id)
    return frame.body
