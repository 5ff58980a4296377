"""A ring member's persistent state in LMDB (DESIGN.md "storage/objects":
members persist their ring state and recover it after a restart).

One LMDB environment per member with these named databases (integers are
big-endian unsigned 64-bit, ``>Q``; values are msgpack unless noted)::

    meta      b"format" -> >I FORMAT
              b"view"   -> >Q  highest view this member has entered or
                               voted for (never goes back: PBFT safety)
              b"exec"   -> >Q  last executed sequence number
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

Writes are buffered (:meth:`put`, :meth:`delete`, :meth:`clear`) and
committed together by :meth:`commit` (group commit: one fsync for whatever
accumulated meanwhile). Reads during operation see the buffered writes.
With ``threaded=True`` the commit runs in a worker thread so the trio thread
keeps serving during the fsync; simulations use ``threaded=False`` because a
thread would let a MockClock jump ahead of the disk.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import lmdb
import trio

from .ring_errors import RingError

FORMAT = 1
DBS = ("meta", "slots", "ckpts", "replies", "objects", "versions", "certs")
U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
_CLEAR = object()


class RingStoreError(RingError):
    """The ring store's files are of an unknown format, or LMDB failed
    (disk full, map full). The member stops rather than run on a state it
    could not persist."""


def u64(n: int) -> bytes:
    return U64.pack(n)


class RingStore:
    """Buffered LMDB access for one member (see module docstring)."""

    def __init__(self, path: str | os.PathLike, *, sync: bool = True, threaded: bool = True,
                 map_size: int = 1 << 30):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.threaded = threaded
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(DBS) + 1,
                                 sync=sync, metasync=sync)
        except lmdb.Error as e:
            raise RingStoreError(f"cannot open ring store {self.path}: {e}") from e
        self.dbs = {name: self.env.open_db(name.encode()) for name in DBS}
        self._pending: dict[tuple[str, bytes], object] = {}
        self._cleared: set[str] = set()
        # Writes taken by a commit still in progress: reads must see them too.
        self._inflight: tuple[dict, set] = ({}, set())
        self._lock = trio.Lock()
        fmt = self.get("meta", b"format")
        if fmt is None:
            with self.env.begin(write=True) as txn:
                txn.put(b"format", U32.pack(FORMAT), db=self.dbs["meta"])
        elif U32.unpack(fmt)[0] != FORMAT:
            raise RingStoreError(f"{self.path} is ring store format {U32.unpack(fmt)[0]}, "
                                 f"this code reads {FORMAT}")

    # -- buffered writes -------------------------------------------------------

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self._pending[(db, key)] = value

    def delete(self, db: str, key: bytes) -> None:
        self._pending[(db, key)] = None

    def clear(self, db: str) -> None:
        """Empty ``db`` (before the buffered writes that follow)."""
        for k in [k for k in self._pending if k[0] == db]:
            del self._pending[k]
        self._cleared.add(db)

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

    def _write(self, pending, cleared) -> None:
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

    async def commit(self) -> None:
        """Make every buffered write durable, in one transaction."""
        async with self._lock:      # transactions commit in the order they were taken
            if not self.dirty:
                return
            pending, cleared = self._inflight = self._take()
            try:
                if self.threaded:
                    await trio.to_thread.run_sync(self._write, pending, cleared)
                else:
                    self._write(pending, cleared)
            finally:
                self._inflight = ({}, set())

    def commit_sync(self) -> None:
        if self.dirty:
            self._write(*self._take())

    def close(self) -> None:
        self.env.close()
