"""A ring member's persistent state in LMDB (DESIGN.md "storage/objects":
members persist their ring state and recover it after a restart).

One LMDB environment per member with these named databases (integers are
big-endian unsigned 64-bit, ``>Q``; values are msgpack unless noted)::

    meta      b"format" -> >I FORMAT
              b"view"   -> >Q  highest view this member has entered or
                               voted for (never goes back: PBFT safety)
              b"exec"   -> [n, time]: last executed seq (maybe tentatively)
              b"committed" -> n: executed and decided up to here
              b"mute"   -> view: say nothing in views up to this (see below)
              b"stable" -> {n, d, proof}: last stable checkpoint and its
                               2f+1 signed CHECKPOINTs
              b"ring"   -> the current RingDescriptor (encoded)
    slots     seq -> {acc: pre-prepare accepted in the highest view (with
                     its batch), prep: [pre-prepare, prepares] the
                     highest-view prepared certificate, dec: digest decided}
    ckpts     seq -> snapshot bytes of the state after executing seq
    replies   client key (32) + rid -> result bytes (the dedup table)
    objects   AGUID -> object state (see ``storage.ring``)
    versions  AGUID + seq -> [vguid, prev, time] (history of every version)
    certs     AGUID -> encoded full certificate of the newest version seen
    undo      seq + >I k -> [db, key, value before]: how to take back the
                     tentative execution of seq (its k-th first write)

Invariants, true after every committed transaction:

S1  ``exec`` and everything execution wrote (replies, objects, versions)
    change in the same transaction: the state on disk is always the state
    after executing exactly ``exec``.
S2  a member sends a protocol message only after the transaction recording
    what the message commits it to (accepted pre-prepare, prepared
    certificate, view) has committed: after a crash it never contradicts
    what it said before (an amnesiac member would count as a second fault).
S3  ``slots`` holds no seq at or below the stable checkpoint; ``ckpts``
    holds the stable checkpoint and the newer, not yet stable, ones.
S4  every write of an execution above ``committed`` has its undo record,
    written in the same transaction: a member can always return to the
    state after ``committed`` (:meth:`undo_from`), even after a restart.

Writes are buffered (:meth:`put`, :meth:`delete`, :meth:`clear`) and
committed together by :meth:`commit` (group commit: one transaction for
whatever accumulated meanwhile). Reads during operation see the buffered
writes. With ``threaded=True`` the commit runs in a worker thread so the
trio thread keeps serving meanwhile; simulations use ``threaded=False``
because a thread would let a MockClock jump ahead of the disk (the
same holds for an fsync). With ``threaded=False`` commits and fsyncs run at
once on the calling thread, without yielding. (An fsync in a worker thread
while the member reads on was tried: on this 2-core machine the hand-offs
cost more CPU than the overlap saved, and latency did not improve.)

Durability (what fsync is for). A committed LMDB transaction is in the
file (the kernel's page cache) at once: it survives the member *process*
crashing or being killed, which is what S2 needs. Only an operating-system
crash or power loss can take back a commit that was not fsynced. So
``commit(durable=False)`` (the protocol steps: pre-prepares, prepares,
commits, views) costs no fsync, and ``commit(durable=True)`` (the executed
state before its results leave the member: client replies and certificate
shares, which a client may rely on for ever) fsyncs it and everything
before it. To keep S2 across an operating-system crash too, the store
records the kernel's boot id while it is open: a store that was not closed
cleanly and finds another boot id when reopened sets :attr:`maybe_lost`,
and the member then stays mute in the views it may have spoken in
(``pbft.Replica.recover``), which costs liveness at worst, never safety.
With ``sync=False`` nothing is ever fsynced (tests, and benchmarks that say
so).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import lmdb
import msgpack
import trio

from .ring_errors import RingError

FORMAT = 1
DBS = ("meta", "slots", "ckpts", "replies", "objects", "versions", "certs", "undo")
SESSION = b"session"       # meta key: boot id while open, absent after a clean close
U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
_CLEAR = object()


class RingStoreError(RingError):
    """The ring store's files are of an unknown format, or LMDB failed
    (disk full, map full). The member stops rather than run on a state it
    could not persist."""


def u64(n: int) -> bytes:
    return U64.pack(n)


def boot_id() -> bytes:
    """The running kernel's boot id (changes at every boot; Linux), or
    b"?" where there is none (no reboot is ever detected then)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b"?"


class RingStore:
    """Buffered LMDB access for one member (see module docstring)."""

    def __init__(self, path: str | os.PathLike, *, sync: bool = True, threaded: bool = True,
                 map_size: int = 1 << 30):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.threaded = threaded
        self.fsyncs = sync          # fsync durable commits (False: never)
        try:
            # fsync only when a commit asks for it (see module docstring).
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(DBS) + 1,
                                 sync=False, metasync=False)
        except lmdb.Error as e:
            raise RingStoreError(f"cannot open ring store {self.path}: {e}") from e
        self.dbs = {name: self.env.open_db(name.encode()) for name in DBS}
        self._pending: dict[tuple[str, bytes], object] = {}
        self._cleared: set[str] = set()
        # Writes taken by a commit still in progress: reads must see them too.
        self._inflight: tuple[dict, set] = ({}, set())
        self._unsynced = False     # a commit since the last fsync
        self._journal: int | None = None
        self._journal_seen: set = set()
        self._journal_k = 0
        self._lock = trio.Lock()
        fmt = self.get("meta", b"format")
        if fmt is None:
            with self.env.begin(write=True) as txn:
                txn.put(b"format", U32.pack(FORMAT), db=self.dbs["meta"])
        elif U32.unpack(fmt)[0] != FORMAT:
            raise RingStoreError(f"{self.path} is ring store format {U32.unpack(fmt)[0]}, "
                                 f"this code reads {FORMAT}")
        # Open without a clean close before, under another kernel: the
        # machine crashed while we ran, and un-fsynced commits may be gone.
        prev = self.get("meta", SESSION)
        self.maybe_lost = prev is not None and prev != boot_id()
        with self.env.begin(write=True) as txn:
            txn.put(SESSION, boot_id(), db=self.dbs["meta"])
        self._fsync()

    # -- buffered writes -------------------------------------------------------

    def put(self, db: str, key: bytes, value: bytes) -> None:
        if self._journal is not None:
            self._journal_write(db, key)
        self._pending[(db, key)] = value

    def delete(self, db: str, key: bytes) -> None:
        if self._journal is not None:
            self._journal_write(db, key)
        self._pending[(db, key)] = None

    def clear(self, db: str) -> None:
        """Empty ``db`` (before the buffered writes that follow)."""
        if self._journal is not None:
            raise RingStoreError(f"clearing {db} cannot be undone (inside a tentative execution)")
        for k in [k for k in self._pending if k[0] == db]:
            del self._pending[k]
        self._cleared.add(db)

    # -- undo records (S4) -----------------------------------------------------------

    def journal(self, seq: int | None) -> None:
        """Record how to undo the writes that follow, as those of seq's
        tentative execution; ``None`` stops recording."""
        self._journal = seq
        self._journal_seen = set()
        self._journal_k = len(self.items("undo", u64(seq))) if seq is not None else 0

    def _journal_write(self, db: str, key: bytes) -> None:
        if (db, key) in self._journal_seen:
            return
        self._journal_seen.add((db, key))
        before = self.get(db, key)
        self._pending[("undo", u64(self._journal) + U32.pack(self._journal_k))] = \
            msgpack.packb([db, key, before], use_bin_type=True)
        self._journal_k += 1

    def undo_from(self, seq: int) -> list[tuple[str, bytes]]:
        """Take back the tentative executions of seq and later, newest write
        first; returns the (db, key)s restored, for the caller to reload."""
        if self._journal is not None:
            raise RingStoreError("undo while recording")
        records = [(k, v) for k, v in self.items("undo") if U64.unpack(k[:8])[0] >= seq]
        touched = []
        for k, raw in reversed(records):
            db, key, before = msgpack.unpackb(raw, raw=False)
            self._pending[(db, key)] = before
            self._pending[("undo", k)] = None
            touched.append((db, key))
        return touched

    def forget_undo(self, upto: int) -> None:
        """Seqs up to ``upto`` are decided: their writes stay for good."""
        for k, _ in self.items("undo"):
            if U64.unpack(k[:8])[0] > upto:
                break
            self._pending[("undo", k)] = None

    @property
    def dirty(self) -> bool:
        return bool(self._pending or self._cleared)

    # -- reads (see buffered writes) -----------------------------------------------

    def get(self, db: str, key: bytes) -> bytes | None:
        k = (db, key)
        for pending, cleared in (self._pending_layers()):
            if k in pending:
                return pending[k]
            if db in cleared:
                return None
        with self.env.begin(db=self.dbs[db]) as txn:
            v = txn.get(key)
            return None if v is None else bytes(v)

    def items(self, db: str, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Committed and buffered items of ``db`` whose key starts with
        ``prefix``, in key order. For recovery and small scans only."""
        out = {}
        layers = list(reversed(self._pending_layers()))   # oldest first
        if not any(db in cleared for _, cleared in layers):
            with self.env.begin(db=self.dbs[db]) as txn:
                cur = txn.cursor()
                if cur.set_range(prefix):
                    for k, v in cur:
                        if not k.startswith(prefix):
                            break
                        out[bytes(k)] = bytes(v)
        for pending, cleared in layers:
            if db in cleared:
                out = {}
            for (d, k), v in pending.items():
                if d == db and k.startswith(prefix):
                    if v is None:
                        out.pop(k, None)
                    else:
                        out[k] = v
        return sorted(out.items())

    def _pending_layers(self):
        """Buffered writes newest first: not yet taken, then in flight."""
        return [(self._pending, self._cleared), self._inflight]

    # -- commit ------------------------------------------------------------------------

    def _take(self):
        pending, cleared = self._pending, self._cleared
        self._pending, self._cleared = {}, set()
        return pending, cleared

    def _fsync(self) -> None:
        if self.fsyncs:
            try:
                self.env.sync(True)
            except lmdb.Error as e:
                raise RingStoreError(f"ring store {self.path}: fsync failed: {e}") from e

    def _write(self, pending, cleared, durable: bool = True) -> None:
        try:
            with self.env.begin(write=True) as txn:
                for db in cleared:
                    txn.drop(self.dbs[db], delete=False)
                for (db, key), value in pending.items():
                    if value is None:
                        txn.delete(key, db=self.dbs[db])
                    else:
                        txn.put(key, value, db=self.dbs[db])
        except lmdb.Error as e:
            raise RingStoreError(f"ring store {self.path}: write failed: {e}") from e
        if durable:
            self._fsync()

    async def commit(self, durable: bool = True) -> None:
        """Commit every buffered write in one transaction; with ``durable``
        also fsync it (and every commit before it). See module docstring."""
        if not self.threaded:
            # All on this thread, at once: nothing to order, no need to yield
            # (a ring member flushes often; each yield is a scheduler pass).
            self.commit_now(durable)
            return
        async with self._lock:      # transactions commit in the order they were taken
            if self.dirty:
                pending, cleared = self._inflight = self._take()
                self._unsynced = True
                try:
                    if self.threaded:
                        await trio.to_thread.run_sync(self._write, pending, cleared, False)
                    else:
                        self._write(pending, cleared, False)
                finally:
                    self._inflight = ({}, set())
            if durable:
                await self._sync()

    async def sync(self) -> None:
        """fsync every commit so far (a no-op if there is none)."""
        if not self.threaded:
            self._sync_now()
            return
        async with self._lock:
            await self._sync()

    def commit_now(self, durable: bool = True) -> None:
        """:meth:`commit` on the calling thread (a store opened with
        ``threaded=False``; blocks for the fsync if ``durable``)."""
        if self.threaded:
            raise RingStoreError("commit_now on a threaded store (use commit)")
        if self.dirty:
            self._write(*self._take(), False)
            self._unsynced = True
        if durable:
            self._sync_now()

    def _sync_now(self) -> None:
        if self._unsynced and self.fsyncs:
            self._unsynced = False
            self._fsync()
        self._unsynced = False

    async def _sync(self) -> None:
        if self._unsynced and self.fsyncs:
            self._unsynced = False
            if self.threaded:
                await trio.to_thread.run_sync(self._fsync)
            else:
                self._fsync()
        self._unsynced = False

    def commit_sync(self) -> None:
        if self.dirty:
            self._write(*self._take())

    def close(self) -> None:
        """Mark the close as clean (fsynced) and close. Writes still buffered
        are dropped, as a crash would drop them."""
        try:
            with self.env.begin(write=True) as txn:
                txn.delete(SESSION, db=self.dbs["meta"])
            self._fsync()
        except (lmdb.Error, RingStoreError):
            pass            # closing anyway: the next open treats it as a crash
        self.env.close()
