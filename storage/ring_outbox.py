"""Per-peer message queues of a ring member.

PBFT messages are one-way, but the transport is request/response: a member
sends each peer its queued messages in one ``pbft.msgs`` request at a time
and waits for the (empty) answer before sending the next. Whatever queues
up meanwhile goes in the next frame, so under load many PRE-PREPAREs,
PREPAREs and COMMITs share a frame (batching for free), and the order of
messages to one peer is kept. A peer that is down or stopped costs one
timeout per attempt and a bounded queue; messages past the bound, or in a
frame that failed, are dropped: PBFT tolerates lost messages (view changes
and catch-up recover), and a member never blocks on a dead peer.
"""

from __future__ import annotations

import logging
from collections import deque

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
    return len(msgpack.packb(m, use_bin_type=True))


class Outbox:
    """Messages for one peer, sent in order by :meth:`run`."""

    def __init__(self, transport, peer: Peer, *, max_queue: int = 20000, timeout: float = 2.0):
        self.transport = transport
        self.peer = peer
        self.max_queue = max_queue
        self.timeout = timeout
        self._q: deque = deque()
        self._ready = trio.Event()
        self.sent = 0
        self.dropped = 0
        self.failures = 0

    def put(self, msg: dict) -> None:
        self._q.append(msg)
        if len(self._q) > self.max_queue:
            self._q.popleft()
            self.dropped += 1
        self._ready.set()

    def __len__(self) -> int:
        return len(self._q)

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
        backoff = 0.0
        while True:
            if not self._q:
                self._ready = trio.Event()
                await self._ready.wait()
            msgs = self._take()
            try:
                await self.transport.request(self.peer, MSGS, {"msgs": msgs},
                                             timeout=self.timeout)
                self.sent += len(msgs)
                backoff = 0.0
            except (PeerError, RemoteError) as e:
                self.failures += 1
                self.dropped += len(msgs)
                backoff = min(max(0.05, backoff * 2), 1.0)
                log.debug("to %s: %d messages lost (%s); retry in %.2fs",
                          short(self.peer.id), len(msgs), e, backoff)
                await trio.sleep(backoff)
            except ValueError:
                # A frame our own schema refuses (e.g. one message over the
                # frame cap): a bug or an oversized view change; drop it.
                log.exception("to %s: could not encode %d messages", short(self.peer.id),
                              len(msgs))
                self.dropped += len(msgs)
