"""A PBFT replica: a generic ordered state machine over a ``Transport``
(Castro and Liskov, "Practical Byzantine Fault Tolerance and Proactive
Recovery", TOCS 20(4) 2002; PAPERS.md "PBFT").

n = 3f+1 members; the primary of view v is member v mod n. The primary
batches client requests and orders each batch at a sequence number with a
PRE-PREPARE; a member with the pre-prepare and 2f matching PREPAREs is
*prepared*, and with 2f+1 matching COMMITs the batch is *decided* at that
seq. The primary collects both quorums and relays them (``ring_agreement``:
3(n-1) messages per batch, not 2n^2). Decided batches execute strictly in
sequence order, within the water marks (h, h+L] where h is the last stable
checkpoint. Every K executions a member takes a checkpoint (a snapshot of
its state and its digest) and signs a CHECKPOINT; 2f+1 matching ones make
it stable, and the log before it is discarded.

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
(``ring_transfer``). Members send each other their messages in one-way
frames (``ring_outbox``), handled in the receiving connection's reading
task. Side effects follow S2 of ``ring_store``: every message
and every reply to a client is released only after the writes it depends on
are committed (one group commit per burst of events, by ``_flush_loop``);
the commit is fsynced only when results of an execution are released (the
executed state a client may rely on), and a member that finds it may have
lost un-fsynced commits in an operating-system crash stays mute in the views
it may have spoken in.

Replies. Each member answers the clients that asked it with its result and
its certificate share once the result is durable (``ring_requests``). After
executing a batch, a backup sends the primary its shares of every result
(SHARES), so the primary can answer a client that asked it alone with a
whole certificate (2f+1 shares): one request per update instead of 3f+1.

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
from .ring_agreement import AgreementMixin, Slot
from .ring_checkpoint import CheckpointMixin
from .ring_errors import NotAMember
from .ring_execution import ExecutionMixin
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
}, {"res": Bytes(max=64 * 1024),
    # The answering member's view (clients find the primary with it) and,
    # from the primary, the other members' shares of the result's body, by
    # member index (b"" for none): with its own share in ``res``, a whole
    # certificate.
    "view": frames.Optional(Int(0, 2**63 - 1)),
    "sigs": frames.Optional(frames.ListOf(Bytes(max=64), max=64))})


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

    def share(self, result: bytes) -> tuple[bytes, bytes] | None:
        """(the body a certificate of ``result`` would certify, our signature
        of it), or None if the result certifies nothing."""

    def share_ok(self, member_key: bytes, body: bytes, sig: bytes) -> bool:
        """Whether ``sig`` is that member's valid share of ``body``."""

    def tentative_ok(self, op: bytes) -> bool:
        """Whether ``op`` may run before its batch is decided (it will be
        taken back through the store's undo records if need be)."""

    def reloaded(self, db: str, key: bytes) -> None:
        """The store's value under (db, key) was taken back: re-read it."""

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
    send_timeout: float = 2.0         # longest an outbox may take to hand a frame over
    max_outbox: int = 20000
    max_pending: int = 20000
    max_wait: float = 30.0             # longest a client request handler waits
    max_skew_ms: int = 120_000         # batch time vs our clock, normal case
    client_window: int = 64            # request ids remembered per client
    share_wait: float = 0.5            # primary: how long to wait for the others' shares
    share_check: float = 0.25          # primary: fraction of shares it checks (ring_requests)
    tentative: bool = True             # execute once prepared (TOCS 5.1.2)
    commit_delay: float = 0.05         # primary: hold COMMITTED this long for a ride


class Replica(AgreementMixin, ExecutionMixin, RequestMixin, CheckpointMixin, ViewChangeMixin,
              TransferMixin):
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
        self.exec_seq = 0                # executed, maybe tentatively (ring_execution)
        self.committed_seq = 0           # executed and decided, for good
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
        self._later: list[tuple[int, int, dict]] = []   # (epoch, member, COMMITTED): _take_in
        self._wake: list[tuple] = []
        self._durable = False                    # the next commit releases results: fsync
        self._waiters: dict[tuple, trio.Event] = {}
        self._unreleased: set[tuple] = set()     # executed, result not yet durable
        self._dirty = trio.Event()
        self.mute_view = -1                      # say nothing in views up to this one
        self._timer_changed = trio.Event()
        self.outboxes: dict[int, Outbox] = {}
        self.stats = {"executed": 0, "batches": 0, "view_changes": 0, "bad_msgs": 0,
                      "catchups": 0, "state_transfers": 0, "rollbacks": 0}
        self.base: tuple[int, bytes] = (0, b"")   # (seq, digest) this epoch started from
        self.retired = False                      # replaced: no longer a member
        self._nursery: trio.Nursery | None = None
        self._outbox_scope: trio.CancelScope | None = None
        self._init_viewchange()
        self._init_transfer()
        self._init_agreement()
        self._init_requests()
        self._init_execution()

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
        c = st.get("meta", b"committed")
        self.committed_seq = self.exec_seq if c is None else msgpack.unpackb(c)
        if self.exec_seq > self.committed_seq:
            # Tentative executions that never got decided before we
            # stopped: take them back (S4); they run again once decided.
            for db, key in st.undo_from(self.committed_seq + 1):
                if db not in ("replies", "ckpts", "meta"):
                    self.app.reloaded(db, key)
            e = st.get("meta", b"exec")
            self.exec_seq, self.last_time = (0, 0) if e is None else msgpack.unpackb(e)
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
                pp = rec["prep"][0]
                slot.prepared = (pp["v"], pp["d"]) == (slot.view, slot.digest)
            if rec.get("dec"):
                slot.decided = (rec["dec"][0], rec["dec"][1])
        self.next_seq = max([self.exec_seq, self.h] + [s.n for s in self.slots.values()
                                                        if s.view == self.view]) + 1
        mute = st.get("meta", b"mute")
        self.mute_view = -1 if mute is None else msgpack.unpackb(mute)
        if st.maybe_lost and self.view > self.mute_view:
            # An operating-system crash may have taken back commits we had
            # already acted on (un-fsynced, ring_store): we may have sent
            # messages in this view that we no longer know of, so we send
            # none in it; we speak again from the next view on. Durable
            # before anything else, so a second restart keeps the rule.
            self.mute_view = self.view
            st.put("meta", b"mute", msgpack.packb(self.mute_view))
            st.commit_sync()
            log.warning("member %d: the machine crashed under our store; mute in views up to "
                        "%d", self.i, self.mute_view)
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
            n.start_soon(self._commit_relay_loop)
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

    def traffic(self) -> dict[str, int]:
        """Protocol traffic so far: frames this member sent to the others
        (one-way, ``ring_outbox``) and the messages in them."""
        obs = self.outboxes.values()
        return {"frames_sent": sum(o.frames for o in obs), "msgs_sent": sum(o.sent for o in obs)}

    # ------------------------------------------------------------ effects

    def _kick(self) -> None:
        self._dirty.set()

    def _send(self, msg: dict, to: int | None = None) -> None:
        """Queue a message for one member or (``to=None``) all others."""
        if msg["t"] in M.AGREEMENT and msg["v"] <= self.mute_view:
            return                     # see recover(): we may contradict ourselves
        if to is None and self._held_cc and msg["t"] in ("pp", "pc"):
            self._release_committed()  # they ride in the same frames
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
            out, wake, durable = self._out, self._wake, self._durable
            self._out, self._wake, self._durable = [], [], False
            await self.store.commit(durable=False)       # S2: committed before released
            results = []
            if durable:
                # Results (client replies, certificate shares) only once
                # fsynced. Other messages need not wait for the disk, but a
                # COMMIT for a member that gets results too goes in their
                # frame (a backup's COMMIT with its SHARES: one frame, and
                # the decision it serves is on nobody's critical path).
                later = {to for to, msg in out if msg["t"] in M.RESULTS}
                for to, msg in out:
                    if msg["t"] in M.RESULTS or (msg["t"] == "c" and to in later):
                        results.append((to, msg))
                    else:
                        self._route(to, msg)
            else:
                for to, msg in out:
                    self._route(to, msg)
            if durable:
                # A few scheduler passes let the outboxes put what was routed
                # on the wire before an inline fsync stops this thread.
                if out and not self.store.threaded:
                    for _ in range(4):
                        if all(ob.idle for ob in self.outboxes.values()):
                            break
                        await trio.sleep(0)
                await self.store.sync()
            for to, msg in results:
                self._route(to, msg)
            for key in wake:
                self._unreleased.discard(key)
                ev = self._waiters.pop(key, None)
                if ev is not None:
                    ev.set()
            if self._later:
                self._take_in_later()      # (its effects: the next round)

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
        """A frame of protocol messages from another member: one-way
        (``ring_outbox``), handled in the connection's reading task, so it
        never blocks; what they make us do leaves by the flush loop."""
        j = self.ring.index_of(sender)
        if j is None or j == self.i or self.retired:
            raise Refused("not_member", f"not a protocol peer in ring epoch {self.ring.epoch}")
        self._take_in(j, body["msgs"])
        return {}

    def _take_in(self, j: int, msgs: list) -> None:
        """Process messages member j sent us. COMMITTEDs wait until what the
        others made us do has left (:meth:`_take_in_later`): a backup's
        COMMITTED rides with the next PRE-PREPARE, whose PREPARE is on the
        next update's critical path, while the decision only makes an
        executed batch final."""
        if self.retired or j >= self.ring.n:
            return
        for m in msgs:
            try:
                t = M.check_shape(m)
                # Direct messages must come from the member they name: the
                # transport proved the sender (this is our MAC). A request
                # and a NEW-VIEW prove themselves: anyone may relay them.
                if t not in ("rq", "nv") and m["i"] != j:
                    raise BadMessage(f"{t} from member {j} claims to be from {m['i']}")
                if t == "cc":
                    self._later.append((self.ring.epoch, j, m))
                    continue
                self._on_msg(j, t, m)
            except BadMessage as e:
                self._dropped(j, e)
        self._kick()

    def _take_in_later(self) -> None:
        later, self._later = self._later, []
        for epoch, j, m in later:
            if epoch != self.ring.epoch or self.retired:
                continue                  # the ring changed meanwhile: j is someone else
            try:
                self._on_msg(j, m["t"], m)
            except BadMessage as e:
                self._dropped(j, e)
        if later:
            self._kick()

    def _dropped(self, j: int, e: BadMessage) -> None:
        self.stats["bad_msgs"] += 1
        self._bad_from[j] += 1
        # The first one from each member, then one in a thousand: a faulty
        # member must not flood the log.
        if self._bad_from[j] % 1000 == 1:
            log.warning("member %d: dropping message from member %d (%d so far): %s",
                        self.i, j, self._bad_from[j], e)

    def _on_msg(self, j: int, t: str, m: dict) -> None:
        if t in M.AGREEMENT:
            if m["v"] > self.seen_view[j]:
                self.seen_view[j] = m["v"]
            if t in ("c", "cc") and m["n"] > self.seen_seq[j]:
                self.seen_seq[j] = m["n"]
            if m["v"] < self.view:
                return
            if m["v"] > self.view or self.in_vc:
                if len(self._future) < 50000:
                    self._future.append((j, m))
                return
            if not self.h < m["n"] <= self.h + self.cfg.window:
                if m["n"] > self.h + self.cfg.window:
                    self._above_window = True     # (ring_transfer: we may be behind)
                return
            self._agreement_handlers[t](j, m)
        elif t == "sh":
            self._on_shares(j, m)
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

    # ------------------------------------------------------------ execution

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
        return (not self.in_vc and not self.retired and self.view > self.mute_view
                and self.ctx.primary(self.view) == self.i)

    def _try_propose(self) -> None:
        if not self.is_primary() or self.need_state:
            return
        cfg = self.cfg
        if self.my_inflight:
            # In flight until decided (a batch a NEW-VIEW re-proposed may have
            # been decided in the old view already) or dropped at a checkpoint:
            # a stale entry would hold back every later batch (pipeline 1).
            self.my_inflight = {n for n in self.my_inflight
                                if (s := self.slots.get(n)) is not None and s.decided is None}
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
