"""The block store's LMDB environment, shared by threads: read transactions
through a gate, write transactions one at a time, and *quiet sections*
during which no read transaction is open (DESIGN.md "storage/blocks";
``storage.blockstore``, "Threads").

Aborting a write transaction and resizing the map run in a quiet section,
because py-lmdb makes both wait until no LMDB call of the process is in
flight; why that needs a gate, and why the gate is fair both ways, is
``_Gate``'s docstring.

Map growth: the map starts at the size the store asks for and doubles on
MapFullError, up to the limit it gives (then the transaction is retried
once); past that a write is StoreFull, as is a disk error.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import lmdb

from .errors import StoreClosed, StoreFull

# The store's log, as before this module was split out of it.
log = logging.getLogger("storage.blockstore")


class _Gate:
    """Read transactions, and now and then one *quiet section* during which
    no read transaction of this store is open.

    Why: py-lmdb's ``Transaction.abort()`` of a write transaction and
    ``Environment.set_mapsize()`` both wait until no LMDB call of the
    process is in flight (an environment-wide count of calls made with the
    GIL released). Readers looping on other threads keep that count above
    zero nearly all the time, so an abort (of a refused or map-full put) or a
    map resize could wait for minutes. Both therefore run in a quiet section.

    Fairness, both ways: a pending quiet section closes the gate, so read
    transactions that arrive meanwhile queue instead of overtaking it, and it
    waits only for those already open (each a few lookups; the store runs no
    caller code inside one). When it ends it admits every reader that queued
    behind it at once, counted as open, so the next quiet section waits for
    them in turn: a reader waits for at most one quiet section and a quiet
    section for at most the transactions open when it began. Both waits are
    thus bounded by the length of one short transaction or section, whatever
    the load (no timeout needed; none would be safe for an abort, which must
    happen)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._active = 0      # read transactions open (or admitted to open)
        self._closed = False  # a quiet section is pending or running
        self._queued = 0      # readers waiting for the current one to end
        self._generation = 0  # quiet sections ended so far

    @contextmanager
    def shared(self):
        with self._cond:
            if self._closed:
                self._queued += 1
                gen = self._generation
                try:
                    while self._generation == gen:
                        self._cond.wait()
                except BaseException:   # interrupted while queued
                    if self._generation == gen:
                        self._queued -= 1
                    else:
                        self._release()
                    raise
                # Admitted (and counted in _active) by the section that ended.
            else:
                self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._release()

    def _release(self) -> None:
        """One read transaction is over (caller holds _cond)."""
        self._active -= 1
        if not self._active and self._closed:
            self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            while self._closed:  # callers hold the write lock: never in practice
                self._cond.wait()
            self._closed = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                # Admit the queue, counted as open, before anyone else runs.
                self._closed = False
                self._active += self._queued
                self._queued = 0
                self._generation += 1
                self._cond.notify_all()



class GatedEnv:
    """An open LMDB environment ``env`` used from many threads, named by
    ``path`` in errors; its map may grow up to ``max_map`` bytes (or the
    size it already has, if larger: a grown map stays grown). ``read``
    yields read transactions; ``write`` runs write transactions; ``close``
    waits for the calls in flight."""

    def __init__(self, env: lmdb.Environment, path: Path, max_map: int):
        self.path = path
        self._env = env
        self._wlock = threading.Lock()
        self._gate = _Gate()
        self.map_size = env.info()["map_size"]  # LMDB's current map size
        self._max_map = max(max_map, self.map_size)

    def close(self) -> None:
        """Close the environment; waits for calls in flight. Idempotent."""
        with self._wlock, self._gate.exclusive():
            if self._env is not None:
                self._env.close()
                self._env = None

    @property
    def closed(self) -> bool:
        return self._env is None

    @contextmanager
    def read(self):
        with self._gate.shared():
            env = self._live()
            with env.begin(buffers=False) as txn:
                yield txn

    def write(self, apply):
        """Run ``apply(txn)`` in one write transaction and commit it. On
        MapFullError the map is grown and the whole transaction retried once;
        if it cannot grow, StoreFull. A disk error is StoreFull as well.

        Writers are serialised by ``_wlock`` and do not take the gate (a map
        resize and ``close`` hold ``_wlock`` too). Aborting a write
        transaction, though, drains every LMDB call of the process (see
        ``_Gate``), so a refused batch is aborted in a quiet section."""
        with self._wlock:
            for attempt in range(2):
                env = self._live()
                try:
                    txn = env.begin(write=True)
                except lmdb.DiskError as e:
                    raise StoreFull(f"disk error writing {self.path}: {e}") from None
                try:
                    result = apply(txn)
                except lmdb.MapFullError:
                    grown = self._quietly(abort=txn, grow=not attempt)
                except lmdb.DiskError as e:
                    self._quietly(abort=txn)
                    raise StoreFull(f"disk error writing {self.path}: {e}") from None
                except BaseException:
                    self._quietly(abort=txn)
                    raise
                else:
                    try:
                        txn.commit()  # on failure LMDB has freed the txn: nothing to abort
                        return result
                    except lmdb.MapFullError:
                        grown = not attempt and self._quietly(grow=True)
                    except lmdb.DiskError as e:
                        raise StoreFull(f"disk error writing {self.path}: {e}") from None
                if not grown:
                    raise StoreFull(f"LMDB map of {self.path} is full at "
                                    f"{self.map_size} bytes and cannot grow")
        raise AssertionError("unreachable")

    def _quietly(self, *, abort=None, grow: bool = False) -> bool:
        """In one quiet section: abort the write transaction ``abort`` if
        given, then grow the map if ``grow``. Returns whether it grew."""
        with self._gate.exclusive():
            if abort is not None:
                abort.abort()
            return grow and self._grow()

    def _grow(self) -> bool:
        """Double the map (up to ``_max_map``). Caller holds _wlock
        and is in a quiet section (set_mapsize invalidates every open
        transaction of the process and, like an abort, drains its calls)."""
        new = min(self.map_size * 2, self._max_map)
        if new <= self.map_size:
            return False
        self._live().set_mapsize(new)
        self.map_size = self._env.info()["map_size"]
        log.info("block store %s: LMDB map grown to %d bytes", self.path, self.map_size)
        return True

    def _live(self):
        env = self._env
        if env is None:
            raise StoreClosed(f"block store {self.path} is closed")
        return env
