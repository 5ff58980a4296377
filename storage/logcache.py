"""A participant's local LMDB cache of what it fetched: log blocks, snapshot
pages, file data and the log-heads it accepted (DESIGN.md "storage/logs";
Ivy section 5 keeps the same kind of cache in each client).

Blocks are immutable and named by their BGUID, so a cached copy is never
stale and needs no invalidation: :class:`CachedBlockAccess` answers ``get``
from the cache and fills it on every miss and every put. A remount thus
reads the newest snapshot and the records after it from local disk, and only
what other writers wrote since goes over the network. Accepted heads are kept
too, so a client that restarts still detects a log-head rolled back behind
one it had accepted before.

Layout: one LMDB environment (a directory, mode 0700, since it holds the
volume's plaintext) with named databases::

    blocks   kind (1 byte) || BGUID -> plaintext
    heads    writer id -> encoded log-head (the newest accepted)
    meta     b"format" -> >I FORMAT (1)

When the map is full the ``blocks`` database is emptied and filling starts
again (a cache may forget anything); ``heads`` is never dropped.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import lmdb

from .blockapi import BlockAccess, Kind
from .errors import StoreFormatError

log = logging.getLogger(__name__)

FORMAT = 1
_U32 = struct.Struct(">I")


class LogCache:
    """The LMDB environment of one participant's cache (blocking calls, all
    small or single-block, made from the trio thread)."""

    def __init__(self, path: str | os.PathLike, *, map_size: int = 1 << 30):
        path = Path(path)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=4, subdir=True)
        self._blocks = self.env.open_db(b"blocks")
        self._heads = self.env.open_db(b"heads")
        self._meta = self.env.open_db(b"meta")
        with self.env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self._meta)
            if fmt is None:
                txn.put(b"format", _U32.pack(FORMAT), db=self._meta)
            elif _U32.unpack(fmt)[0] != FORMAT:
                raise StoreFormatError(f"cache {path} has format {_U32.unpack(fmt)[0]}, "
                                       f"this code reads {FORMAT}")
        self.resets = 0

    def close(self) -> None:
        self.env.close()

    def get_block(self, bguid: bytes, kind: Kind) -> bytes | None:
        with self.env.begin(db=self._blocks) as txn:
            v = txn.get(bytes((kind,)) + bguid)
            return bytes(v) if v is not None else None

    def put_blocks(self, items: list[tuple[bytes, Kind, bytes]]) -> None:
        try:
            with self.env.begin(write=True, db=self._blocks) as txn:
                for g, kind, plaintext in items:
                    txn.put(bytes((kind,)) + g, plaintext)
        except lmdb.MapFullError:
            log.info("block cache full: emptying it")
            with self.env.begin(write=True) as txn:
                txn.drop(self._blocks, delete=False)
            self.resets += 1

    def heads(self) -> dict[bytes, bytes]:
        with self.env.begin(db=self._heads) as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}

    def remember_heads(self, heads: dict[bytes, bytes]) -> None:
        with self.env.begin(write=True, db=self._heads) as txn:
            for w, raw in heads.items():
                txn.put(w, raw)


class CachedBlockAccess(BlockAccess):
    """A BlockAccess that keeps every block it saw in a :class:`LogCache`."""

    def __init__(self, inner: BlockAccess, cache: LogCache):
        self.inner = inner
        self.cache = cache
        self.hits = 0
        self.misses = 0

    def name_of(self, kind: Kind, plaintext: bytes) -> bytes | None:
        return self.inner.name_of(kind, plaintext)

    async def put(self, kind: Kind, plaintext: bytes) -> bytes:
        g = await self.inner.put(kind, plaintext)
        self.cache.put_blocks([(g, kind, bytes(plaintext))])
        return g

    async def put_many(self, items: list[tuple[Kind, bytes]]) -> list[bytes]:
        gs = await self.inner.put_many(items)
        self.cache.put_blocks([(g, k, bytes(p)) for g, (k, p) in zip(gs, items)])
        return gs

    async def get(self, bguid: bytes, kind: Kind) -> bytes:
        return (await self.get_many([(bguid, kind)]))[0]

    async def get_many(self, items: list[tuple[bytes, Kind]]) -> list[bytes]:
        out: list[bytes | None] = [self.cache.get_block(g, k) for g, k in items]
        missing = [i for i, v in enumerate(out) if v is None]
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        if missing:
            got = await self.inner.get_many([items[i] for i in missing])
            for i, v in zip(missing, got):
                out[i] = v
            self.cache.put_blocks([(items[i][0], items[i][1], v) for i, v in zip(missing, got)])
        return out  # type: ignore[return-value]

