"""A PBFT replica: a generic ordered state machine over a ``Transport``
(Castro and Liskov, "Practical Byzantine Fault Tolerance and Proactive
Recovery", TOCS 20(4) 2002; PAPERS.md "PBFT").

n = 3f+1 members; the primary of view v is member v mod n. The primary
batches client requests and orders each batch at a sequence number with a
PRE-PREPARE; backups PREPARE it; a member with the pre-prepare and 2f
matching prepares is *prepared* and sends COMMIT; with 2f+1 matching commits
the batch is *decided* at that seq. Decided batches execute strictly in
sequence order, within the water marks (h, h+L] where h is the last stable
checkpoint. Every K executions a member takes a checkpoint (a snapshot of its
state and its digest) and signs a CHECKPOINT; 2f+1 matching ones make it
stable, and the log before it is discarded.

Invariants (f or fewer faulty members):

* no two correct members decide different batches at one seq (a prepared
  certificate needs 2f+1 members of which f+1 are correct, two such sets
  intersect in a correct member, and a correct member prepares at most one
  digest per (view, seq); view changes carry prepared certificates forward);
* every correct member executes the same batches in the same order, so its
  deterministic application state, replies and checkpoints are identical;
* a client request (client key, request id) is executed at most once: the
  replicated reply table remembers the last ``client_window`` ids of each
  client and answers retries from it.

Liveness comes from timers (view change, ``ring_viewchange``) and catch-up
(``ring_transfer``). Side effects follow S2 of ``ring_store``: every message
and every reply to a client is released only after the writes it depends on
are durable (one group commit per burst of events, by ``_flush_loop``).

The application plugs in through :class:`App`. It must be deterministic: its
result may depend only on its state and (client, rid, op, time, seq).
"""

from __future__ import annotations

import logging
import time as _time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

import msgpack
import trio

from overlay.wire import frames
from overlay.wire.frames import PUBKEY, SIG, Bytes, Int
from overlay.wire.ids import Identity, guid, short
from overlay.wire.transport import Peer, Refused

from . import ring_messages as M
from .certificate import RingDescriptor
from .ring_checkpoint import CheckpointMixin
from .ring_errors import NotAMember
from .ring_messages import BadMessage, RingContext
from .ring_outbox import Outbox
from .ring_requests import Pending, RequestMixin
from .ring_store import RingStore, u64
from .ring_transfer import TransferMixin
from .ring_viewchange import ViewChangeMixin

log = logging.getLogger(__name__)

REQ = frames.message("pbft.req", {
    "c": PUBKEY, "r": Int(0, 2**63 - 1), "op": Bytes(max=M.MAX_OP), "s": SIG,
    "wait": float,
}, {"res": Bytes(max=64 * 1024)})


class App(Protocol):
    """The replicated application (see module docstring)."""

    def check_op(self, client: bytes, op: bytes) -> None:
        """Cheap syntactic check before ordering; raise BadMessage."""

    def execute(self, client: bytes, rid: int, op: bytes, time_ms: int, seq: int) -> bytes:
        """Apply one request; return its deterministic result."""

    def stale_result(self) -> bytes:
        """The result for a request id older than the reply table remembers."""

    def snapshot(self):
        """The state as a msgpack-able value, deterministic."""

    def restore(self, snap) -> None:
        """Replace the state (and its stored form) with a snapshot's."""

    def reply(self, client: bytes, rid: int, result: bytes) -> bytes:
        """What this member answers the client (may add a signature)."""

    def take_config(self) -> RingDescriptor | None:
        """A new ring descriptor the last executed request installed (member
        replacement), or None. The replica switches to it after the batch."""


@dataclass
class PbftConfig:
    checkpoint_interval: int = 128     # K
    window: int = 256                  # L
    batch_max: int = 64                # requests per batch
    pipeline: int = 2                  # batches the primary keeps in flight (more: smaller batches)
    request_timeout: float = 1.0       # forward at half of it, view change at all of it
    view_change_timeout: float = 1.0   # doubled per failed view change ...
    max_backoff: int = 3               # ... at most 2**3 times
    catchup_interval: float = 0.5
    send_timeout: float = 2.0
    max_outbox: int = 20000
    max_pending: int = 20000
    max_wait: float = 30.0             # longest a client request handler waits
    max_skew_ms: int = 120_000         # batch time vs our clock, normal case
    client_window: int = 64            # request ids remembered per client


class Slot:
    """What one member knows of one sequence number."""

    __slots__ = ("n", "view", "digest", "batch", "pp", "prepares", "commits", "prepared",
                 "decided")

    def __init__(self, n: int):
        self.n = n
        self.view = -1
        self.digest: bytes | None = None
        self.batch: bytes | None = None
        self.pp: dict | None = None
        self.prepares: dict[int, dict] = {}               # member -> PREPARE
        self.commits: dict[int, tuple[int, bytes]] = {}   # member -> (view, digest)
        self.prepared = False
        self.decided: tuple[bytes, bytes] | None = None   # (digest, batch)


class Replica(RequestMixin, CheckpointMixin, ViewChangeMixin, TransferMixin):
    """One member of an inner ring (see module docstring)."""

    def __init__(self, identity: Identity, ring: RingDescriptor, app: App, store: RingStore,
                 transport, config: PbftConfig | None = None,
                 clock: Callable[[], float] = _time.time):
        self.me = identity
        self.ring = ring
        self.ctx = RingContext(ring)
        self.i = ring.index_of(identity.id)
        if self.i is None:
            raise NotAMember(f"{short(identity.id)} is not a member of ring "
                             f"{short(ring.ring_id)} at epoch {ring.epoch}")
        self.app = app
        self.store = store
        self.transport = transport
        self.cfg = config or PbftConfig()
        self.clock = clock
        self.f = ring.f
        # protocol state
        self.view = 0
        self.in_vc = False
        self.h = 0                       # last stable checkpoint
        self.stable_digest = b""
        self.stable_proof: list[dict] = []
        self.exec_seq = 0
        self.last_time = 0               # ms; replicated (batch times only grow)
        self.slots: dict[int, Slot] = {}
        self.pset: dict[int, tuple[dict, list[dict]]] = {}   # highest prepared certs
        self.clients: dict[bytes, dict[int, bytes]] = {}     # reply table
        self.ck_own: dict[int, bytes] = {}                   # our checkpoint digests
        self.ck_msgs: dict[int, dict[int, dict]] = {}
        self.pending: OrderedDict[tuple, Pending] = OrderedDict()
        self.queue: OrderedDict[tuple, None] = OrderedDict()  # primary: not yet proposed
        self.next_seq = 1
        self.my_inflight: set[int] = set()
        self._last_proposed_time = 0
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._future: list[tuple[int, dict]] = []
        self.seen_seq = [0] * ring.n
        self.seen_view = [0] * ring.n
        self._bad_from = [0] * ring.n
        # effects, released by _flush_loop after the store commits
        self._out: list[tuple[int | None, dict]] = []
        self._wake: list[tuple] = []
        self._waiters: dict[tuple, trio.Event] = {}
        self._unreleased: set[tuple] = set()     # executed, result not yet durable
        self._dirty = trio.Event()
        self._timer_changed = trio.Event()
        self.outboxes: dict[int, Outbox] = {}
        self.stats = {"executed": 0, "batches": 0, "view_changes": 0, "bad_msgs": 0,
                      "catchups": 0, "state_transfers": 0}
        self.base: tuple[int, bytes] = (0, b"")   # (seq, digest) this epoch started from
        self.retired = False                      # replaced: no longer a member
        self._nursery: trio.Nursery | None = None
        self._outbox_scope: trio.CancelScope | None = None
        self._init_viewchange()
        self._init_transfer()

    # ------------------------------------------------------------------ setup

    def register(self, dispatcher) -> None:
        """Serve this member's message types on a node's Dispatcher."""
        dispatcher.on(M.MSGS, self._on_msgs)
        dispatcher.on(REQ, self._on_request)
        self._register_transfer(dispatcher)

    def recover(self) -> None:
        """Load persisted state (after a restart) or start from genesis."""
        st = self.store
        b = st.get("meta", b"base")
        if b is None:
            # The initial state, before anything executed: the epoch's base.
            self.base = (0, guid(self._snapshot_bytes()))
            st.put("meta", b"base", msgpack.packb(list(self.base)))
        else:
            self.base = tuple(msgpack.unpackb(b))
        if st.get("meta", b"ring") is None:
            st.put("meta", b"ring", self.ring.encode())
        v = st.get("meta", b"view")
        if v is not None:
            self.view, in_vc = msgpack.unpackb(v)
            self.in_vc = bool(in_vc)
        e = st.get("meta", b"exec")
        if e is not None:
            self.exec_seq, self.last_time = msgpack.unpackb(e)
        s = st.get("meta", b"stable")
        if s is not None:
            self.h, self.stable_digest, self.stable_proof = msgpack.unpackb(s, raw=False)
        else:
            self.h, self.stable_digest = self.base
        for k, raw in st.items("replies"):
            self.clients.setdefault(k[:32], {})[int.from_bytes(k[32:], "big")] = raw
        for k, raw in st.items("ckpts"):
            self.ck_own[int.from_bytes(k, "big")] = guid(raw)
        for k, raw in st.items("slots"):
            n = int.from_bytes(k, "big")
            rec = msgpack.unpackb(raw, raw=False)
            slot = self.slots[n] = Slot(n)
            if rec.get("acc"):
                pp = rec["acc"]
                slot.view, slot.digest, slot.batch, slot.pp = pp["v"], pp["d"], pp["b"], pp
            if rec.get("prep"):
                self.pset[n] = (rec["prep"][0], rec["prep"][1])
            if rec.get("dec"):
                slot.decided = (rec["dec"][0], rec["dec"][1])
        self.next_seq = max([self.exec_seq, self.h] + [s.n for s in self.slots.values()
                                                        if s.view == self.view]) + 1
        self._recover_viewchange()
        self._try_execute()
        log.info("member %d (%s) recovered: view %d%s, exec %d, stable %d", self.i,
                 short(self.me.id), self.view, " (view change)" if self.in_vc else "",
                 self.exec_seq, self.h)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the member's background tasks (the transport is served by
        the caller, with :meth:`register`'d handlers)."""
        if not self.base[1]:
            self.recover()
        async with trio.open_nursery() as n:
            self._nursery = n
            self._start_outboxes()
            n.start_soon(self._flush_loop)
            n.start_soon(self._timer_loop)
            n.start_soon(self._catchup_loop)
            if self.in_vc:
                self._resend_view_change()
            self._kick()
            task_status.started()

    def _start_outboxes(self) -> None:
        """One outbox per other member of the current ring (again after a
        reconfiguration: the old ones are cancelled, their queues dropped)."""
        if self._outbox_scope is not None:
            self._outbox_scope.cancel()
        self.outboxes = {}
        if self.retired:
            return
        scope = self._outbox_scope = trio.CancelScope()
        for j, m in enumerate(self.ring.members):
            if j != self.i:
                self.outboxes[j] = Outbox(self.transport, Peer(m.id, m.addr),
                                          max_queue=self.cfg.max_outbox,
                                          timeout=self.cfg.send_timeout)
        boxes = list(self.outboxes.values())

        async def run_all():
            with scope:
                async with trio.open_nursery() as n:
                    for ob in boxes:
                        n.start_soon(ob.run)

        self._nursery.start_soon(run_all)

    # ------------------------------------------------------------ effects

    def _kick(self) -> None:
        self._dirty.set()

    def _send(self, msg: dict, to: int | None = None) -> None:
        """Queue a message for one member or (``to=None``) all others."""
        self._out.append((to, msg))
        self._dirty.set()

    def _route(self, to: int | None, msg: dict) -> None:
        """Hand a released message to the outboxes (Byzantine members
        override this to lie)."""
        if to is None:
            for ob in self.outboxes.values():
                ob.put(msg)
        elif to in self.outboxes:
            self.outboxes[to].put(msg)

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            out, wake = self._out, self._wake
            self._out, self._wake = [], []
            await self.store.commit()          # S2: durable before released
            for to, msg in out:
                self._route(to, msg)
            for key in wake:
                self._unreleased.discard(key)
                ev = self._waiters.pop(key, None)
                if ev is not None:
                    ev.set()

    # ------------------------------------------------------------ persistence

    def _persist_view(self) -> None:
        self.store.put("meta", b"view", msgpack.packb([self.view, self.in_vc]))

    def _persist_slot(self, slot: Slot) -> None:
        prep = self.pset.get(slot.n)
        self.store.put("slots", u64(slot.n), msgpack.packb({
            "acc": slot.pp, "prep": list(prep) if prep else None,
            "dec": list(slot.decided) if slot.decided else None}, use_bin_type=True))

    # ------------------------------------------------------------ incoming

    async def _on_msgs(self, sender: bytes, body: dict) -> dict:
        j = self.ring.index_of(sender)
        if j is None or j == self.i or self.retired:
            raise Refused("not_member", f"not a protocol peer in ring epoch {self.ring.epoch}")
        for m in body["msgs"]:
            try:
                t = M.check_shape(m)
                # Direct messages must come from the member they name: the
                # transport proved the sender (this is our MAC).
                if t != "rq" and m["i"] != j:
                    raise BadMessage(f"{t} from member {j} claims to be from {m['i']}")
                self._on_msg(j, t, m)
            except BadMessage as e:
                self.stats["bad_msgs"] += 1
                self._bad_from[j] += 1
                # The first one from each member, then one in a thousand: a
                # faulty member must not flood the log.
                if self._bad_from[j] % 1000 == 1:
                    log.warning("member %d: dropping message from member %d (%d so far): %s",
                                self.i, j, self._bad_from[j], e)
        self._kick()
        return {}

    def _on_msg(self, j: int, t: str, m: dict) -> None:
        if t in ("pp", "p", "c"):
            if m["v"] > self.seen_view[j]:
                self.seen_view[j] = m["v"]
            if t == "c" and m["n"] > self.seen_seq[j]:
                self.seen_seq[j] = m["n"]
            if m["v"] < self.view:
                return
            if m["v"] > self.view or self.in_vc:
                if len(self._future) < 50000:
                    self._future.append((j, m))
                return
            if not self.h < m["n"] <= self.h + self.cfg.window:
                return
            {"pp": self._on_pre_prepare, "p": self._on_prepare,
             "c": self._on_commit}[t](j, m)
        elif t == "ck":
            self._on_checkpoint(j, m)
        elif t == "vc":
            self._on_view_change(j, m)
        elif t == "nv":
            self._on_new_view(j, m)
        elif t == "rq":
            self._on_forwarded(j, m)

    def _replay_future(self) -> None:
        future, self._future = self._future, []
        for j, m in future:
            try:
                self._on_msg(j, m["t"], m)
            except BadMessage as e:
                log.warning("member %d: dropping buffered message from %d: %s", self.i, j, e)

    # ------------------------------------------------------------ normal case

    def _slot(self, n: int) -> Slot:
        s = self.slots.get(n)
        if s is None:
            s = self.slots[n] = Slot(n)
        return s

    def _on_pre_prepare(self, j: int, pp: dict) -> None:
        if j != self.ctx.primary(pp["v"]):
            raise BadMessage(f"pre-prepare from member {j}, who is not the primary")
        slot = self._slot(pp["n"])
        if slot.view == pp["v"] and slot.pp is not None:
            if slot.digest != pp["d"]:
                log.warning("member %d: primary %d equivocates at seq %d", self.i, j, pp["n"])
            return
        M.check_pre_prepare(self.ctx, pp)
        time_ms, reqs = M.decode_batch(pp["b"])
        if abs(time_ms - self._now_ms()) > self.cfg.max_skew_ms:
            raise BadMessage(f"batch time {time_ms} is off our clock by more than "
                             f"{self.cfg.max_skew_ms} ms")
        self._check_requests(reqs)
        self._accept_pp(slot, pp)

    def _check_requests(self, reqs) -> None:
        for r in reqs:
            p = self.pending.get(r.key)
            if p is not None and p.req == r:
                continue
            d = r.digest()
            if d in self._verified:
                continue
            r.check_signature(self.ring.ring_id)
            self.app.check_op(r.c, r.op)
            self._verified[d] = None
            if len(self._verified) > 16384:
                self._verified.popitem(last=False)

    def _accept_pp(self, slot: Slot, pp: dict) -> None:
        v = pp["v"]
        if slot.decided and slot.decided[0] != pp["d"]:
            log.error("member %d: seq %d decided %s but view %d proposes %s", self.i, slot.n,
                      short(slot.decided[0]), v, short(pp["d"]))
            return
        slot.view, slot.digest, slot.batch, slot.pp = v, pp["d"], pp["b"], pp
        slot.prepared = False
        slot.prepares = {k: p for k, p in slot.prepares.items() if p["v"] >= v}
        slot.commits = {k: c for k, c in slot.commits.items() if c[0] >= v}
        self._persist_slot(slot)
        if self.i != self.ctx.primary(v):
            p = M.prepare(self.ctx, self.me, self.i, v, slot.n, slot.digest)
            slot.prepares[self.i] = p
            self._send(p)
        self._check_prepared(slot)

    def _on_prepare(self, j: int, p: dict) -> None:
        if j == self.ctx.primary(p["v"]):
            raise BadMessage("the primary does not send prepares")
        slot = self._slot(p["n"])
        old = slot.prepares.get(j)
        if old is not None and old["v"] >= p["v"]:
            return                                # duplicate or replay
        if slot.prepared and slot.view == p["v"]:
            return                                # not needed any more
        self.ctx.check_sig(p)
        slot.prepares[j] = p
        self._check_prepared(slot)

    def _check_prepared(self, slot: Slot) -> None:
        if slot.prepared or slot.pp is None:
            return
        key = (slot.view, slot.digest)
        ps = [p for p in slot.prepares.values() if (p["v"], p["d"]) == key]
        if len(ps) < 2 * self.f:
            return
        slot.prepared = True
        self.pset[slot.n] = (slot.pp, ps)
        self._persist_slot(slot)
        slot.commits[self.i] = key
        self._send(M.commit(self.i, slot.view, slot.n, slot.digest))
        self._check_committed(slot)

    def _on_commit(self, j: int, c: dict) -> None:
        slot = self._slot(c["n"])
        old = slot.commits.get(j)
        if old is not None and old[0] >= c["v"]:
            return
        slot.commits[j] = (c["v"], c["d"])
        self._check_committed(slot)

    def _check_committed(self, slot: Slot) -> None:
        if slot.decided or not slot.prepared:
            return
        key = (slot.view, slot.digest)
        if sum(1 for c in slot.commits.values() if c == key) >= 2 * self.f + 1:
            self._decide(slot, slot.digest, slot.batch)

    def _decide(self, slot: Slot, digest: bytes, batch: bytes) -> None:
        slot.decided = (digest, batch)
        self._persist_slot(slot)
        self._try_execute()

    # ------------------------------------------------------------ execution

    def _try_execute(self) -> None:
        while True:
            slot = self.slots.get(self.exec_seq + 1)
            if slot is None or slot.decided is None or self.need_state:
                return
            self._execute(slot)

    def _execute(self, slot: Slot) -> None:
        n = slot.n
        time_ms, reqs = M.decode_batch(slot.decided[1])
        t = max(time_ms, self.last_time)
        for r in reqs:
            tbl = self.clients.get(r.c)
            if tbl is None or r.r not in tbl:
                if tbl and len(tbl) >= self.cfg.client_window and r.r < min(tbl):
                    res = None                    # stale: not applied, not remembered
                else:
                    res = self.app.execute(r.c, r.r, r.op, t, n)
                    tbl = self.clients.setdefault(r.c, {})
                    tbl[r.r] = res
                    self.store.put("replies", r.c + u64(r.r), res)
                    if len(tbl) > self.cfg.client_window:
                        old = min(tbl)
                        del tbl[old]
                        self.store.delete("replies", r.c + u64(old))
                    self.stats["executed"] += 1
            self._wake.append(r.key)
            self._unreleased.add(r.key)
            self.pending.pop(r.key, None)
            self.queue.pop(r.key, None)
        self.exec_seq = n
        self.last_time = t
        self.store.put("meta", b"exec", msgpack.packb([n, t]))
        self.stats["batches"] += 1
        self.my_inflight.discard(n)
        self.vc_attempts = 0
        for p in self.pending.values():       # progress: the timers start again
            p.since = trio.current_time()
        self._timer_changed.set()
        if n % self.cfg.checkpoint_interval == 0:
            self._take_checkpoint(n)
        self._after_execute(n)
        self._try_propose()

    def _after_execute(self, n: int) -> None:
        new = self.app.take_config()
        if new is not None:
            self._reconfigure(new, n)

    def result_of(self, c: bytes, r: int) -> bytes | None:
        tbl = self.clients.get(c)
        return None if tbl is None else tbl.get(r)

    def is_stale(self, c: bytes, r: int) -> bool:
        tbl = self.clients.get(c)
        return bool(tbl) and len(tbl) >= self.cfg.client_window and r < min(tbl) \
            and r not in tbl

    # ------------------------------------------------------------ primary

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def is_primary(self) -> bool:
        return not self.in_vc and not self.retired and self.ctx.primary(self.view) == self.i

    def _try_propose(self) -> None:
        if not self.is_primary() or self.need_state:
            return
        cfg = self.cfg
        while (self.queue and len(self.my_inflight) < cfg.pipeline
               and self.next_seq <= self.h + cfg.window):
            reqs = []
            while self.queue and len(reqs) < cfg.batch_max:
                key, _ = self.queue.popitem(last=False)
                p = self.pending.get(key)
                if p is not None:
                    reqs.append(p.req)
            if not reqs:
                return
            t = max(self._now_ms(), self._last_proposed_time)
            self._last_proposed_time = t
            n = self.next_seq
            self.next_seq += 1
            self.my_inflight.add(n)
            self._propose(n, M.encode_batch(t, reqs))

    def _propose(self, n: int, batch: bytes) -> None:
        pp = M.pre_prepare(self.ctx, self.me, self.i, self.view, n, batch)
        self._send(pp)
        self._accept_pp(self._slot(n), pp)
