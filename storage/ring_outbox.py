"""Per-peer message queues of a ring member.

PBFT messages are one-way, but the transport is request/response, and a
round trip costs the same as two messages (each frame is a TLS record, a
wake-up and a decode at both ends). So both halves carry messages: a member
sends a peer its queued messages in one ``pbft.msgs`` request, and the peer
answers, once what those messages made it do is committed (S2 of
``ring_store``), with *its* queued messages for the sender in the reply.
With tentative execution (``ring_execution``) every backup message
answers a primary message (PREPARE answers PRE-PREPARE, COMMIT and SHARES
answer PREPARED), and the primary's COMMITTED rides with its next
PRE-PREPARE: a batch costs two round trips per backup and no other frames.

How: while a handler answers a frame from peer j, it holds (:meth:`hold`)
our outbox for j, which then sends nothing, and puts what queued up into
its reply (:meth:`take`). A reply is lost if the sender stopped waiting for
it (its request timed out: it was slow or paused, or we were), so frames
carry the sender's clock reading ``at`` and only a fresh one (younger than
half the send timeout by our clock) gets messages in its reply; the primary
also re-sends what stalls (``ring_agreement``).

Whatever is left, or comes later, the outbox sends itself, in frames of up
to ``FRAME_MSGS`` messages, at most ``inflight`` frames at a time (under
load many messages share a frame: batching for free); messages in replies
go to ``deliver``. Messages to one peer may arrive out of order: PBFT does
not mind. A peer that is down or stopped costs one timeout per attempt and a
bounded queue; messages past the bound, or in a frame that failed, are
dropped: PBFT tolerates lost messages (retransmission, view changes and
catch-up recover), and a member never blocks on a dead peer.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import msgpack
import trio

from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError, RemoteError

from .ring_messages import MSGS

log = logging.getLogger(__name__)

FRAME_BUDGET = 4 * 1024 * 1024   # bytes of messages per frame (the frame cap is 8 MiB)
FRAME_MSGS = 1024


def _size(m: dict) -> int:
    t = m["t"]
    if t in ("p", "c", "ck"):
        return 160
    if t == "pp":
        return 200 + len(m["b"])
    if t in ("pc", "cc"):
        return 100 + 160 * len(m["ps" if t == "pc" else "cs"])
    if t == "sh":
        return 100 + 70 * len(m["s"])
    return len(msgpack.packb(m, use_bin_type=True))


class Outbox:
    """Messages for one peer (see module docstring)."""

    def __init__(self, transport, peer: Peer, *, deliver: Callable[[list], None] | None = None,
                 max_queue: int = 20000, timeout: float = 2.0, inflight: int = 4,
                 clock: Callable[[], float] | None = None):
        self.transport = transport
        self.peer = peer
        self.deliver = deliver
        self.max_queue = max_queue
        self.timeout = timeout
        self._q: deque = deque()
        self._idle: deque[trio.Event] = deque()    # workers waiting for work
        self._held = 0
        self.inflight = max(1, inflight)
        self.clock = clock
        self.frames = 0         # requests sent (each a round trip)
        self.sent = 0           # messages in them
        self.replied = 0        # messages that went in our replies instead
        self.dropped = 0
        self.failures = 0
        self._backoff = 0.0

    def put(self, msg: dict) -> None:
        self._q.append(msg)
        if len(self._q) > self.max_queue:
            self._q.popleft()
            self.dropped += 1
        self._wake_one()

    def _wake_one(self) -> None:
        # One idle worker takes what is queued; waking them all would cost
        # a task switch each for nothing.
        if self._idle and not self._held:
            self._idle.popleft().set()

    def __len__(self) -> int:
        return len(self._q)

    def hold(self) -> None:
        """A reply to this peer is being prepared: leave the queue to it."""
        self._held += 1

    def release(self) -> None:
        self._held -= 1
        if self._q:
            self._wake_one()

    def take(self) -> list[dict]:
        """Queued messages for a reply (a frame's worth at most)."""
        out = self._take()
        self.replied += len(out)
        return out

    def _take(self) -> list[dict]:
        out, budget = [], FRAME_BUDGET
        while self._q and len(out) < FRAME_MSGS:
            s = _size(self._q[0])
            if out and s > budget:
                break
            out.append(self._q.popleft())
            budget -= s
        return out

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.inflight):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        # ``inflight`` of these per peer, each sending one frame at a time.
        while True:
            if not self._q or self._held:
                ev = trio.Event()
                self._idle.append(ev)
                try:
                    await ev.wait()
                finally:
                    if not ev.is_set():
                        self._idle.remove(ev)
                continue
            await self._send(self._take())

    async def _send(self, msgs: list[dict]) -> None:
        try:
            body = {"msgs": msgs}
            if self.clock is not None:
                body["at"] = self.clock()
            r = await self.transport.request(self.peer, MSGS, body, timeout=self.timeout)
        except (PeerError, RemoteError) as e:
            self.failures += 1
            self.dropped += len(msgs)
            self._backoff = min(max(0.05, self._backoff * 2), 1.0)
            log.debug("to %s: %d messages lost (%s); retry in %.2fs",
                      short(self.peer.id), len(msgs), e, self._backoff)
            await trio.sleep(self._backoff)
            return
        except ValueError:
            # A frame our own schema refuses (e.g. one message over the
            # frame cap): a bug or an oversized view change; drop it.
            log.exception("to %s: could not encode %d messages", short(self.peer.id),
                          len(msgs))
            self.dropped += len(msgs)
            return
        self.frames += 1
        self.sent += len(msgs)
        self._backoff = 0.0
        back = r.get("msgs")
        if back and self.deliver is not None:
            self.deliver(back)
