"""Merging many writers' logs into one state, incrementally (Ivy, OSDI
2002, section 4.1: "everyone with the same view computes the same file
system"; DESIGN.md "storage/logs").

The state a reader shows is the state of *all* records it knows, applied in
the total order of ``storage.vv``. Records of other writers arrive in
batches (on refresh), and a newly fetched record may sort before records
already applied (it was written concurrently, in a partition, say). A
:class:`Replica` keeps two states so that this costs a bounded replay and
never a full one:

* ``base``: the state of the *settled prefix* of the order, records that
  every active writer has promised to have seen. A writer's promise is the
  version vector in its signed log-head (for ourselves: all we know), and
  every record it writes afterwards carries a vector at least that large.
  So a settled record is seen by, hence sorts before, every record still to
  come: the prefix never changes again, and it holds no conflict
  bookkeeping (``FsState.trim``). Snapshots are taken of ``base``.
* ``current``: ``base`` plus the unsettled records (``pending``), in order.

Adding records that all sort after ``pending`` applies them to ``current``;
otherwise ``current`` is rebuilt as a copy of ``base`` plus the merged
pending records (a rollback to the checkpoint and replay). Own new records
always sort last (their vector covers everything known), so local
operations never roll back.

A record that sorts before the end of ``base`` means a writer broke its
promise (or a snapshot covered records it should not have): the Replica
raises :class:`LateRecord` and the caller starts over from an older origin.
"""

from __future__ import annotations

from .errors import StorageError
from .fsapply import apply
from .fsstate import FsState
from .records import Record
from .vv import EMPTY, VV, meet_all


class LateRecord(StorageError):
    """A record sorts before records already settled in the base state: its
    writer published a promise (log-head vector) and then wrote a record that
    does not honour it, or the snapshot this replica started from covers
    records that were not settled. The caller rebuilds from an older
    snapshot (or from the start of the logs)."""

    def __init__(self, msg: str, record: Record):
        super().__init__(msg)
        self.record = record


class Replica:
    """The merged state of a set of logs (module docstring).

    ``origin`` is the starting state (a loaded snapshot, or a fresh one),
    ``cover`` the records it holds (per writer, the highest seq) and
    ``origin_key`` the order key of its last record.
    """

    def __init__(self, origin: FsState | None = None, cover: VV = EMPTY,
                 origin_key: tuple | None = None, *, self_id: bytes | None = None):
        self.base = origin if origin is not None else FsState()
        self.base_cover = cover
        self.base_key = origin_key
        self.current = self.base.clone()
        self.current.clear_dirty()
        self.pending: list[Record] = []
        self.waiting: dict[bytes, list[Record]] = {}   # fetched, causes not yet known
        self.known: VV = cover              # highest seq known per writer
        self.knowledge: VV = cover          # merge of every known record's vector
        self.last_vv: dict[bytes, VV] = {}  # vector of each writer's newest known record
        self.promises: dict[bytes, VV] = {}
        self.active: set[bytes] = set()
        self.self_id = self_id
        self.pinned: set[int] = set()       # inodes open here: keep their tombs
        self.rollbacks = 0
        self.replayed = 0
        self.settled = 0                    # records moved into base
        self.base_vv: dict[bytes, VV] = {}  # vector of each writer's last settled record

    # ------------------------------------------------------------------

    def add(self, records: list[Record]) -> None:
        """Add newly fetched records (each writer's continuing its log).

        Delivery is causal: a record whose vector says its writer had seen
        records this replica does not have yet (another writer's head was
        fetched at an older point) waits in ``waiting`` until they arrive, so
        the state shown never has an effect without its causes."""
        fresh = [r for r in records if r.seq > self._last_seq(r.writer)]
        if fresh:
            self._check_contiguous(fresh)
            for r in sorted(fresh, key=lambda r: r.seq):
                self.waiting.setdefault(r.writer, []).append(r)
        new = self._deliverable()
        if not new:
            return
        new.sort(key=lambda r: r.key)
        first = new[0]
        if self.base_key is not None and first.key <= self.base_key:
            raise LateRecord(
                f"record {first.writer[:4].hex()}:{first.seq} sorts before settled records",
                first)
        if not self.pending or first.key > self.pending[-1].key:
            for r in new:
                apply(self.current, r)
            self.pending.extend(new)
        else:
            merged = sorted(self.pending + new, key=lambda r: r.key)
            cur = self.base.clone()
            cur.clear_dirty()
            for r in merged:
                apply(cur, r)
            self.current = cur
            self.pending = merged
            self.rollbacks += 1
            self.replayed += len(merged)
        for r in new:
            self._learn(r)

    def add_own(self, rec: Record) -> None:
        """Add a record just written here. Its vector covers everything known,
        so its causes are known and it sorts after every record: no waiting,
        no rollback."""
        if (rec.seq != self.known[rec.writer] + 1 or self.waiting.get(rec.writer)
                or (self.pending and rec.key <= self.pending[-1].key)
                or (self.base_key is not None and rec.key <= self.base_key)):
            self.add([rec])   # not what we write ourselves; take the general path
            return
        apply(self.current, rec)
        self.pending.append(rec)
        self._learn(rec)

    def _last_seq(self, w: bytes) -> int:
        wait = self.waiting.get(w)
        return wait[-1].seq if wait else self.known[w]

    def _deliverable(self) -> list[Record]:
        """Take from ``waiting`` every record whose causes are all known."""
        out, known = [], self.known
        progress = True
        while progress:
            progress = False
            for w, lst in self.waiting.items():
                k = 0
                while k < len(lst):
                    r = lst[k]
                    if r.seq != known[w] + 1 or any(
                            s > known[x] for x, s in r.vv.items() if x != w):
                        break
                    known = known.with_entry(w, r.seq)
                    k += 1
                if k:
                    out.extend(lst[:k])
                    del lst[:k]
                    progress = True
        self.waiting = {w: lst for w, lst in self.waiting.items() if lst}
        return out

    def _check_contiguous(self, new: list[Record]) -> None:
        nxt: dict[bytes, int] = {}
        for r in sorted(new, key=lambda r: (r.writer, r.seq)):
            want = nxt.get(r.writer, self._last_seq(r.writer) + 1)
            if r.seq != want:
                raise ValueError(f"records of {r.writer[:4].hex()} must continue its log: "
                                 f"got seq {r.seq}, expected {want}")
            nxt[r.writer] = want + 1

    def _learn(self, r: Record) -> None:
        self.known = self.known.with_entry(r.writer, r.seq)
        self.knowledge = self.knowledge.merge(r.vv)
        self.last_vv[r.writer] = r.vv

    # ------------------------------------------------------------------
    # Promises and settling

    def set_active(self, writers: set[bytes]) -> None:
        """The writers whose future records may still arrive."""
        self.active = set(writers)

    def promise(self, writer: bytes, vv: VV) -> None:
        """Writer's promise: every record it writes from now on sees ``vv``."""
        old = self.promises.get(writer, EMPTY)
        self.promises[writer] = old.merge(vv)

    def meet(self) -> VV:
        """What every active writer has seen, by its promises."""
        if not self.active:
            return self.knowledge
        vvs = []
        for w in self.active:
            if w == self.self_id:
                vvs.append(self.knowledge)
            else:
                p = self.promises.get(w, EMPTY)
                last = self.last_vv.get(w)
                vvs.append(p.merge(last) if last is not None else p)
        return meet_all(vvs)

    def settle(self) -> int:
        """Move every pending record that all writers have seen into base;
        returns how many moved."""
        meet = self.meet()
        k = 0
        while k < len(self.pending) and meet.sees(self.pending[k].dot):
            r = self.pending[k]
            apply(self.base, r)
            self.base_cover = self.base_cover.with_entry(r.writer, r.seq)
            self.base_key = r.key
            self.base_vv[r.writer] = r.vv
            k += 1
        if k:
            del self.pending[:k]
            self.settled += k
        # Bookkeeping may go only when every record still to be applied on
        # top of a state sees it: future records (the meet), records fetched
        # but waiting for their causes, and, for base, the pending records a
        # rollback replays onto it (an old concurrent record may sort after
        # a settled one without having seen it).
        waiting = [r.vv for lst in self.waiting.values() for r in lst]
        cur_bound = meet.meet(*waiting)
        self.base.trim(cur_bound.meet(*(r.vv for r in self.pending)))
        self.current.trim(cur_bound, self.pinned)
        return k

    def clean(self) -> bool:
        """Whether base is a clean cut: every known record not in it has seen
        all of it, so base alone (without conflict bookkeeping) plus those
        records replays exactly. Snapshots are taken only then."""
        cover = self.base_cover
        return all(cover <= r.vv for r in self.pending) and all(
            cover <= r.vv for lst in self.waiting.values() for r in lst)

    @property
    def state(self) -> FsState:
        """The state to show: every known record applied."""
        return self.current
