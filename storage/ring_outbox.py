"""Per-peer message queues of a ring member.

PBFT messages are one-way (Castro and Liskov, TOCS 2002, section 4: no
message of the normal case answers another at the transport level), and so
is how members exchange them: ``Transport.send`` puts a ``pbft.msgs`` frame
on the connection and waits for nothing; the peer handles it in its
connection's reading task (``Replica._on_msgs``) and sends its own messages
the same way, on its own connection to us. A protocol step therefore costs
one frame and no waiting task at either end (a request and its reply cost
two frames, a waiting task and two more wake-ups). Authentication is the
same as for requests: the receiving transport hands the handler the NodeID
its connection's handshake proved (``ring_messages``: our MAC).

Each outbox has one sender task that takes whatever queued up into one frame
(at most ``FRAME_MSGS`` messages, ``FRAME_BUDGET`` bytes): under load many
messages share a frame, batching for free. Messages to one peer may arrive
out of order (the simulated network does not keep order): PBFT does not
mind. A peer that is down or stopped costs one failed send per attempt and a
bounded queue; messages past the bound, or in a frame that failed, are
dropped: PBFT tolerates lost messages (retransmission, view changes and
catch-up recover), and a member never blocks on a dead peer.
"""

from __future__ import annotations

import logging
from collections import deque

import msgpack
import trio

from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError

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

    def __init__(self, transport, peer: Peer, *, max_queue: int = 20000, timeout: float = 2.0):
        self.transport = transport
        self.peer = peer
        self.max_queue = max_queue
        self.timeout = timeout
        self._q: deque = deque()
        self._wake: trio.Event | None = None     # the sender waits on it when idle
        self._busy = False                       # the sender is handing a frame over
        self.frames = 0         # frames sent
        self.sent = 0           # messages in them
        self.dropped = 0
        self.failures = 0
        self._backoff = 0.0

    def put(self, msg: dict) -> None:
        self._q.append(msg)
        if len(self._q) > self.max_queue:
            self._q.popleft()
            self.dropped += 1
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def __len__(self) -> int:
        return len(self._q)

    @property
    def idle(self) -> bool:
        """Nothing queued and no frame being handed to the transport."""
        return not self._q and not self._busy

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
        while True:
            if not self._q:
                ev = self._wake = trio.Event()
                await ev.wait()
                continue
            self._busy = True
            try:
                await self._send(self._take())
            finally:
                self._busy = False

    async def _send(self, msgs: list[dict]) -> None:
        try:
            await self.transport.send(self.peer, MSGS, {"msgs": msgs}, timeout=self.timeout)
        except PeerError as e:
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
