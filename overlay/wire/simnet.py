"""An in-process simulated network: the second implementation of ``Transport``.

DESIGN.md "wire": one transport interface, two implementations; the very same
node code runs on TCP+TLS and here, on virtual time (``trio.testing.MockClock``),
with thousands of nodes in one process.

How a request travels (``SimTransport.request``)::

    caller task                           receiver's serve() nursery
    -----------                           --------------------------
    frames.encode (schema checked)
    loss / partition / cut checked  ---->  one task per request:
    wait for the reply or timeout            sleep one-way latency
                                             link still up? frames.decode
                                             transport.answer(handler, ...)
                                             loss / partition / cut checked
                                             sleep one-way latency
                                    <----    link still up and caller alive?
    frames.decode, reply_body                hand the reply frame to the caller

So a request costs one task, in the receiver's nursery, and a crash of the
receiver (which cancels that nursery) cancels both messages in flight to it
and handlers running on it. Nothing is kept per link or per peer.

A one-way message (``SimTransport.send``) is the first half of that: the
sender returns at once (after one round trip, and raising, when the peer
refuses or is another node: the connection attempt a real transport would
make); one task in the receiver's nursery sleeps the latency and runs the
handler (``transport.consume``). Lost, partitioned and black-holed messages
vanish silently. Messages sent at the same instant may arrive in any order.

Failure semantics (what a caller observes):

* ``loss``: each message (request or reply) is dropped independently with that
  probability; the caller sees :class:`RequestTimeout`.
* ``partition(*groups)``: each listed group becomes an island; every node not
  listed (including nodes added later) is in one further group, "the rest".
  Two nodes can exchange messages only if they are in the same group. A new
  call replaces the previous partition. Messages already in flight across the
  new boundary are dropped on arrival. ``heal()`` removes partitions and cuts.
* ``cut(a, b)``: the link between a and b drops everything, both ways, until
  ``restore(a, b)`` or ``heal()``.
* ``crash(id)``: the node's serve() returns, its in-flight handlers and the
  messages in flight to it are cancelled; requests to it are black-holed (the
  caller times out) unless ``refuse_when_down`` is set, in which case they fail
  with :class:`PeerUnreachable` after one round trip (a killed process on a
  live host answers with a reset). Requests it makes, and those it is waiting
  on, raise :class:`PeerUnreachable`. ``restart(id)`` lets it serve again with
  the same identity; the node code must call ``serve()`` again.
* A frame that fails to decode at the receiver (``FrameError``) is logged and
  black-holed, as the TLS transport would close that connection.
* ``peer.addr`` naming a node other than ``peer.id``: :class:`PeerAuthError`
  after one round trip (the TLS handshake's NodeID check). An address naming
  no node: :class:`PeerUnreachable` at once.

Determinism: all randomness derives from ``seed``. Loss is decided by a keyed
hash of (direction, both ends, the caller's request number), not by a shared
stream, so that trio's shuffling of tasks woken at the same instant cannot
change which messages are lost; only a node's own concurrent requests started
at the same virtual instant can swap their fates.

``SimNetwork(encode=False)`` passes bodies by reference without encoding, for
scale runs: no schema checks, no byte counts, and a handler must not mutate a
body it received or returned.

Use::

    net = SimNetwork(seed=1, topology=TransitStubTopology(seed=1))
    a, b = net.add(Identity.from_seed(b"a")), net.add(Identity.from_seed(b"b"))
    async with trio.open_nursery() as n:        # under MockClock for virtual time
        await n.start(b.serve, dispatcher)
        reply = await a.request(b.peer, "ping", {...}, timeout=5)
        before = net.stats.copy()
        ...
        print(net.stats.since(before).messages())

Cost: a serving node is about 5 KB (its serve task and nursery), and a request
costs one trio task, two sleeps and one timeout scope, about 0.3 ms of CPU
(mostly trio's own); 10,000 nodes fit in well under 100 MB. Scale benchmarks
should ``gc.freeze()`` after building the network, since Python's cyclic
collector otherwise rescans every long-lived node object.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import trio

from . import frames
from .ids import short
from .topology import PlaneTopology, Topology, TransitStubTopology
from .transport import (
    DEFAULT_TIMEOUT,
    ONE_WAY_ID,
    Handler,
    Peer,
    PeerAuthError,
    PeerProtocolError,
    PeerUnreachable,
    Refused,
    RequestTimeout,
    Transport,
    answer,
    consume,
    reply_body,
)

__all__ = [
    "SimNetwork", "SimTransport", "SimStats",
    "Topology", "PlaneTopology", "TransitStubTopology",
]

log = logging.getLogger(__name__)

ADDRESS_PREFIX = "sim:"
_REQ = b"\x00"
_REP = b"\x01"


def sim_address(node_id: bytes) -> str:
    return ADDRESS_PREFIX + node_id.hex()


_COUNTERS = ("sent", "delivered", "replies_sent", "replies_delivered", "dropped",
             "drop_reasons", "bytes")


@dataclass
class SimStats:
    """Network-wide counters by message type, for benchmarks ("messages per
    join": take ``copy()`` before, then ``since(before)``). A message is a
    request or a reply; ``bytes`` counts frame bytes of both put on the
    simulated wire (0 when the network does not encode)."""

    sent: Counter = field(default_factory=Counter)               # requests sent
    delivered: Counter = field(default_factory=Counter)          # requests that reached a handler
    replies_sent: Counter = field(default_factory=Counter)       # replies (incl. refusals) sent
    replies_delivered: Counter = field(default_factory=Counter)  # replies that reached the caller
    dropped: Counter = field(default_factory=Counter)            # messages lost, either way
    drop_reasons: Counter = field(default_factory=Counter)       # by reason, see _drop callers
    bytes: Counter = field(default_factory=Counter)              # request + reply bytes sent

    def messages(self, msg_type: str | None = None) -> int:
        """Messages put on the wire (requests plus replies), of one type or all."""
        if msg_type is not None:
            return self.sent[msg_type] + self.replies_sent[msg_type]
        return sum(self.sent.values()) + sum(self.replies_sent.values())

    def copy(self) -> "SimStats":
        return SimStats(*(Counter(getattr(self, name)) for name in _COUNTERS))

    def since(self, earlier: "SimStats") -> "SimStats":
        """The counts accumulated after ``earlier`` (a ``copy()``) was taken."""
        return SimStats(*(getattr(self, name) - getattr(earlier, name) for name in _COUNTERS))

    def reset(self) -> None:
        for name in _COUNTERS:
            getattr(self, name).clear()


class _Call:
    """One outstanding request at the caller: where the reply lands."""

    __slots__ = ("event", "reply", "error")

    def __init__(self):
        self.event = trio.Event()
        self.reply = None     # reply frame bytes (or (kind, body) when not encoding)
        self.error: Exception | None = None


class SimNetwork:
    """A simulated network: nodes, a topology, and the faults between them."""

    def __init__(self, seed: int = 0, topology: Topology | None = None, loss: float = 0.0, *,
                 encode: bool = True, refuse_when_down: bool = False,
                 max_frame: int = frames.DEFAULT_MAX_FRAME):
        self.seed = seed
        self.rng = random.Random(seed)
        self.topology = topology if topology is not None else PlaneTopology(seed)
        self.encode = encode
        self.refuse_when_down = refuse_when_down
        self.max_frame = max_frame
        self.stats = SimStats()
        self.nodes: dict[bytes, SimTransport] = {}
        self._loss = 0.0
        self.set_loss(loss)
        self._loss_key = self.rng.getrandbits(128).to_bytes(16, "big")
        self._group: dict[bytes, int] = {}     # node -> partition group (absent: 0)
        self._cuts: set[tuple[bytes, bytes]] = set()

    # -- membership ---------------------------------------------------------

    def add(self, identity, position=None, *,
            refuse_when_down: bool | None = None) -> "SimTransport":
        """Add a node (``identity`` needs only an ``.id``) and return its
        transport. ``position`` is passed to the topology's ``place``."""
        nid = identity.id
        if nid in self.nodes:
            raise ValueError(f"node {short(nid)} is already on this network")
        self.topology.place(nid, position)
        t = SimTransport(self, identity, refuse_when_down)
        self.nodes[nid] = t
        return t

    def transport(self, node_id: bytes) -> "SimTransport":
        return self.nodes[node_id]

    def latency(self, a: bytes, b: bytes) -> float:
        """One-way delay in seconds between two nodes (symmetric)."""
        return self.topology.latency(a, b)

    # -- faults -------------------------------------------------------------

    def set_loss(self, p: float) -> None:
        """Drop each message independently with probability ``p``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError("loss probability must be in [0, 1]")
        self._loss = float(p)

    @property
    def loss(self) -> float:
        return self._loss

    def partition(self, *groups) -> None:
        """Split the network: each group (an iterable of node ids) is an
        island, and all unlisted nodes form one more. Replaces any previous
        partition; link cuts stay."""
        group: dict[bytes, int] = {}
        for i, g in enumerate(groups, start=1):
            for nid in g:
                if nid in group:
                    raise ValueError(f"node {short(nid)} listed in two partition groups")
                group[nid] = i
        self._group = group

    def heal(self) -> None:
        """Remove the partition and every link cut."""
        self._group = {}
        self._cuts.clear()

    def cut(self, a: bytes, b: bytes) -> None:
        """Drop everything on the link a <-> b until restored."""
        self._cuts.add((a, b) if a <= b else (b, a))

    def restore(self, a: bytes, b: bytes) -> None:
        self._cuts.discard((a, b) if a <= b else (b, a))

    def crash(self, node_id: bytes) -> None:
        """Take a node down (see module docstring). No-op if already down."""
        self.nodes[node_id]._crash()

    def restart(self, node_id: bytes) -> None:
        """Bring a crashed node back; it is reachable once it serves again.
        No-op if it is up."""
        self.nodes[node_id].crashed = False

    def is_up(self, node_id: bytes) -> bool:
        return not self.nodes[node_id].crashed

    def connected(self, a: bytes, b: bytes) -> bool:
        """Whether a message can pass between a and b now, loss aside (either
        node may still be down)."""
        return self._severed(a, b) is None

    # -- internals ----------------------------------------------------------

    def _severed(self, a: bytes, b: bytes) -> str | None:
        """"partition" or "cut" if a and b cannot talk now, else None."""
        g = self._group
        if g and g.get(a, 0) != g.get(b, 0):
            return "partition"
        if self._cuts and ((a, b) if a <= b else (b, a)) in self._cuts:
            return "cut"
        return None

    def _blocked(self, a: bytes, b: bytes, seq: int, direction: bytes) -> str | None:
        """Why the message a -> b is dropped as it leaves, or None if it
        goes. ``seq`` is the caller's request number, for a request and for
        its reply; with both ends and the direction it names the message
        uniquely, so each message gets its own loss draw."""
        why = self._severed(a, b)
        if why is not None:
            return why
        p = self._loss
        if p > 0.0:
            h = hashlib.blake2b(direction + a + b + seq.to_bytes(8, "big"),
                                key=self._loss_key, digest_size=8).digest()
            if int.from_bytes(h, "big") < p * 2.0**64:
                return "loss"
        return None

    def _drop(self, msg_type: str, reason: str) -> None:
        self.stats.dropped[msg_type] += 1
        self.stats.drop_reasons[reason] += 1

    def _resolve(self, peer: Peer) -> "SimTransport":
        addr = peer.addr
        node = None
        if isinstance(addr, str) and addr.startswith(ADDRESS_PREFIX):
            try:
                node = self.nodes.get(bytes.fromhex(addr[len(ADDRESS_PREFIX):]))
            except ValueError:
                node = None
        if node is None:
            raise PeerUnreachable(f"no simulated node at {addr!r}", peer.id)
        return node


class SimTransport(Transport):
    """One node's endpoint on a :class:`SimNetwork`. Create with ``net.add``."""

    def __init__(self, net: SimNetwork, identity, refuse_when_down: bool | None = None):
        super().__init__(identity)
        self.net = net
        self.crashed = False
        self._refuse = refuse_when_down
        self._address = sim_address(identity.id)
        self._nursery: trio.Nursery | None = None
        self._handler: Handler | None = None
        self._seq = 0                        # messages this node has sent
        self._pending: set[_Call] = set()    # requests this node waits on

    @property
    def address(self) -> str:
        # Known from the moment the node is added, so node code can hand out
        # its Peer before serving (a real node knows its configured address).
        return self._address

    @property
    def serving(self) -> bool:
        return self._nursery is not None

    def _refuses(self) -> bool:
        return self.net.refuse_when_down if self._refuse is None else self._refuse

    async def serve(self, handler: Handler, *, inline=None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Receive requests until cancelled or crashed (then return). Every
        request gets a task of its own (``inline`` is not used here)."""
        if self.crashed:
            raise RuntimeError(f"node {short(self.id)} is crashed; net.restart() it first")
        if self._nursery is not None:
            raise RuntimeError(f"node {short(self.id)} is already serving")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._handler = handler
            try:
                task_status.started(self._address)
                await trio.sleep_forever()
            finally:
                # A crash already cleared these, and a restarted node may be
                # serving anew before this old serve() gets to run again.
                if self._nursery is nursery:
                    self._nursery = None
                    self._handler = None

    def _crash(self) -> None:
        if self.crashed:
            return
        self.crashed = True
        if self._nursery is not None:
            # serve() returns; its handler tasks and inbound messages die.
            self._nursery.cancel_scope.cancel()
            self._nursery = None
            self._handler = None
        pending, self._pending = self._pending, set()
        for call in pending:
            call.error = PeerUnreachable(f"node {short(self.id)} crashed")
            call.event.set()

    def _outgoing(self, peer: Peer, msg_type: str, body: dict, *, one_way: bool):
        """Resolve, number, encode and count an outgoing request (a one-way
        one carries ONE_WAY_ID as its frame id): (destination, seq, data)."""
        net = self.net
        if self.crashed:
            raise PeerUnreachable(f"this node {short(self.id)} is down", peer.id)
        dst = net._resolve(peer)
        self._seq += 1
        seq = self._seq
        if net.encode:
            data = frames.encode(frames.Kind.REQUEST, msg_type, ONE_WAY_ID if one_way else seq,
                                 body, max_frame=net.max_frame)       # ValueError: our bug
            size = len(data)
        else:
            if msg_type not in frames.REGISTRY:
                raise ValueError(f"outgoing REQUEST {msg_type}: unknown message type")
            data, size = body, 0
        self.stats.sent[msg_type] += 1
        self.stats.bytes_sent += size
        net.stats.sent[msg_type] += 1
        net.stats.bytes[msg_type] += size
        return dst, seq, data

    async def request(self, peer: Peer, msg_type: str, body: dict, *,
                      timeout: float = DEFAULT_TIMEOUT) -> dict:
        net = self.net
        dst, seq, data = self._outgoing(peer, msg_type, body, one_way=False)
        call = _Call()
        self._pending.add(call)
        try:
            with trio.move_on_after(timeout):
                reply = await self._exchange(call, peer, dst, msg_type, seq, data)
                if not net.encode:
                    kind, rbody = reply
                    return reply_body(frames.Frame(kind, msg_type, seq, rbody), peer.id)
                return self._decode_reply(reply, peer, msg_type, seq)
            self.stats.errors["RequestTimeout"] += 1
            raise RequestTimeout(
                f"{msg_type} to {short(peer.id)}: no answer in {timeout:g} s", peer.id)
        except (PeerUnreachable, PeerAuthError, PeerProtocolError) as e:
            self.stats.errors[type(e).__name__] += 1
            raise
        finally:
            self._pending.discard(call)

    async def send(self, peer: Peer, msg_type: str, body: dict, *,
                   timeout: float = DEFAULT_TIMEOUT) -> None:
        """One-way (module docstring; ``Transport.send``)."""
        net = self.net
        dst, seq, data = self._outgoing(peer, msg_type, body, one_way=True)
        why = net._blocked(self.id, dst.id, seq, _REQ)
        if why is not None:
            net._drop(msg_type, why)
            return
        if dst._nursery is None or dst.id != peer.id:
            down = dst._nursery is None
            if down:
                net._drop(msg_type, "down")
                if not dst._refuses():
                    return                        # black-holed, as if delivered
            # The connection attempt fails after one round trip.
            rtt = 2 * net.latency(self.id, dst.id)
            if rtt >= timeout:
                await trio.sleep(timeout)
                self.stats.errors["RequestTimeout"] += 1
                raise RequestTimeout(f"{msg_type} to {short(peer.id)}: not sent in "
                                     f"{timeout:g} s", peer.id)
            await trio.sleep(rtt)
            if down:
                self.stats.errors["PeerUnreachable"] += 1
                raise PeerUnreachable(f"{short(peer.id)} refused: not running", peer.id)
            self.stats.errors["PeerAuthError"] += 1
            raise PeerAuthError(f"{peer.addr} is {short(dst.id)}, not {short(peer.id)}",
                                peer.id)
        dst._nursery.start_soon(dst._arrive, self, msg_type, data)

    async def _arrive(self, src: "SimTransport", msg_type: str, data) -> None:
        """The one task of a one-way message, in the receiver's nursery."""
        net = self.net
        await trio.sleep(net.latency(src.id, self.id))
        why = net._severed(src.id, self.id)
        if why is not None:
            net._drop(msg_type, why)
            return
        frame = self._frame_in(src, msg_type, None, data)
        if frame is not None:
            await consume(self._handler, src.id, frame)

    def _frame_in(self, src: "SimTransport", msg_type: str, seq: int | None,
                  data) -> frames.Frame | None:
        """The request frame a message carries, counted as delivered; None
        (dropped, logged) for bytes a real transport would refuse."""
        net = self.net
        if net.encode:
            try:
                if (len(data) <= frames.HEADER_BYTES
                        or int.from_bytes(data[:frames.HEADER_BYTES], "big")
                        != len(data) - frames.HEADER_BYTES):
                    raise frames.FrameError("length prefix does not match the frame")
                if len(data) - frames.HEADER_BYTES > net.max_frame:
                    raise frames.FrameError(f"frame exceeds cap {net.max_frame}")
                frame = frames.decode(memoryview(data)[frames.HEADER_BYTES:])
                if frame.kind != frames.Kind.REQUEST:
                    raise frames.FrameError(f"expected a request, got {frame.kind.name}")
            except frames.FrameError as e:
                log.warning("dropping bad frame from %s to %s: %s",
                            short(src.id), short(self.id), e)
                net._drop(msg_type, "frame")
                self.stats.errors["FrameError"] += 1
                return None
            self.stats.bytes_received += len(data)
        else:
            frame = frames.Frame(frames.Kind.REQUEST, msg_type,
                                 ONE_WAY_ID if seq is None else seq, data)
        self.stats.received[frame.type] += 1
        net.stats.delivered[frame.type] += 1
        return frame

    async def request_raw(self, peer: Peer, data: bytes, *, msg_type: str = "raw",
                          timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Fault injection for tests: send ``data`` (a whole frame, length
        prefix included, or any garbage) from this node as if it were a
        request, and return the raw reply frame. Garbage is black-holed by
        the receiver, so expect :class:`RequestTimeout`. ``msg_type`` only
        labels the message in ``net.stats``. Needs an encoding network."""
        net = self.net
        if not net.encode:
            raise RuntimeError("request_raw needs SimNetwork(encode=True)")
        if self.crashed:
            raise PeerUnreachable(f"this node {short(self.id)} is down", peer.id)
        dst = net._resolve(peer)
        self._seq += 1
        net.stats.sent[msg_type] += 1
        net.stats.bytes[msg_type] += len(data)
        call = _Call()
        self._pending.add(call)
        try:
            with trio.move_on_after(timeout):
                return await self._exchange(call, peer, dst, msg_type, self._seq, bytes(data))
            raise RequestTimeout(f"raw {msg_type} to {short(peer.id)}: no answer", peer.id)
        finally:
            self._pending.discard(call)

    def _decode_reply(self, data: bytes, peer: Peer, msg_type: str, seq: int) -> dict:
        try:
            frame = frames.decode(memoryview(data)[frames.HEADER_BYTES:])
        except frames.FrameError as e:
            raise PeerProtocolError(f"bad reply from {short(peer.id)}: {e}", peer.id) from None
        if frame.kind == frames.Kind.REQUEST or frame.id != seq or frame.type != msg_type:
            raise PeerProtocolError(f"{short(peer.id)} answered with a mismatched frame", peer.id)
        return reply_body(frame, peer.id)

    async def _exchange(self, call: _Call, peer: Peer, dst: "SimTransport", msg_type: str,
                        seq: int, data):
        """Carry one request to ``dst`` and return the raw reply (frame
        bytes, or (kind, body) when not encoding)."""
        # Every wait below is on ``call.event``, which only a reply or our own
        # crash sets; a black hole is a wait that nothing ends but the timeout.
        net = self.net
        why = net._blocked(self.id, dst.id, seq, _REQ)
        if why is not None:
            net._drop(msg_type, why)
            await call.event.wait()
            raise call.error
        if dst._nursery is None or dst.id != peer.id:
            # A refusal or a failed handshake costs one round trip and no
            # task: the caller's own task waits it out.
            rtt = 2 * net.latency(self.id, dst.id)
            if dst._nursery is None:
                net._drop(msg_type, "down")
                if not dst._refuses():
                    await call.event.wait()
                    raise call.error
                with trio.move_on_after(rtt):
                    await call.event.wait()
                    raise call.error
                raise PeerUnreachable(f"{short(peer.id)} refused: not running", peer.id)
            with trio.move_on_after(rtt):
                await call.event.wait()
                raise call.error
            raise PeerAuthError(f"{peer.addr} is {short(dst.id)}, not {short(peer.id)}",
                                peer.id)
        dst._nursery.start_soon(dst._carry, self, call, msg_type, seq, data)
        await call.event.wait()
        if call.error is not None:
            raise call.error
        return call.reply

    async def _carry(self, src: "SimTransport", call: _Call, msg_type: str,
                     seq: int, data) -> None:
        """The one task of a request, run in this (the receiver's) nursery:
        the request's flight, the handler, and the reply's flight."""
        net = self.net
        d = net.latency(src.id, self.id)
        await trio.sleep(d)
        why = net._severed(src.id, self.id)
        if why is not None:                   # partitioned or cut while in flight
            net._drop(msg_type, why)
            return
        handler = self._handler
        frame = self._frame_in(src, msg_type, seq, data)
        if frame is None:
            return
        if frame.id == ONE_WAY_ID:
            # Raw bytes (request_raw) may be a one-way frame: no reply.
            await consume(handler, src.id, frame)
            return
        if net.encode:
            reply = await answer(handler, src.id, frame, net.max_frame)
            size = len(reply)
        else:
            reply = await _answer_plain(handler, src.id, frame)
            size = 0
        st = net.stats
        st.replies_sent[msg_type] += 1
        st.bytes[msg_type] += size
        self.stats.bytes_sent += size
        why = net._blocked(self.id, src.id, seq, _REP)
        if why is None:
            await trio.sleep(d)
            why = "down" if call.event.is_set() else net._severed(self.id, src.id)
            if why is None:
                call.reply = reply
                st.replies_delivered[msg_type] += 1
                src.stats.bytes_received += size
                call.event.set()
                return
        net._drop(msg_type, why)


async def _answer_plain(handler: Handler, sender: bytes, frame: frames.Frame):
    """``transport.answer`` without encoding: (kind, body) of the reply."""
    try:
        return frames.Kind.REPLY, await handler(sender, frame.type, frame.body)
    except Refused as e:
        return frames.Kind.ERROR, {"code": e.code, "msg": e.msg}
    except trio.Cancelled:
        raise
    except Exception as e:
        log.exception("handler for %s from %s failed", frame.type, short(sender))
        return frames.Kind.ERROR, {"code": "internal", "msg": type(e).__name__}
