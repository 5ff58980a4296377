"""An in-process :class:`~storage.blockapi.BlockAccess` for single-process
tests and tools.

This is *not* a stand-in for the replicated block store: it keeps sealed
blocks in a Python dict of one process, with no replicas, no durability and
no network. It does run the real sealing (``storage.seal``: AES-GCM,
convergent per volume, BGUID = SHA-256 of the sealed bytes) and checks every
block against its BGUID and kind on the way out, so the layers above it
(logs, snapshots, the namespace) see exactly the behaviour and errors of the
real store. Each call yields to trio once, so concurrent callers interleave
as they would over a network.

Tests use two of them, or ``absorb``, to model partitions and their healing,
and ``blocks`` directly to corrupt or hide a block.
"""

from __future__ import annotations

import trio

from . import seal
from .blockapi import BlockAccess, Kind
from .errors import BlockNotFound


class MemoryBlockAccess(BlockAccess):
    """Sealed blocks of one volume in a dict (module docstring)."""

    def __init__(self, volume_key: bytes):
        self._sealer = seal.Sealer(volume_key)
        self.blocks: dict[bytes, bytes] = {}   # BGUID -> sealed bytes
        self.puts = 0
        self.gets = 0

    def name_of(self, kind: Kind, plaintext: bytes) -> bytes | None:
        return self._sealer.seal(kind, bytes(plaintext)).bguid

    async def put(self, kind: Kind, plaintext: bytes) -> bytes:
        await trio.lowlevel.checkpoint()
        s = self._sealer.seal(kind, bytes(plaintext))
        self.blocks[s.bguid] = s.data
        self.puts += 1
        return s.bguid

    async def get(self, bguid: bytes, kind: Kind) -> bytes:
        await trio.lowlevel.checkpoint()
        self.gets += 1
        data = self.blocks.get(bguid)
        if data is None:
            raise BlockNotFound("no such block in this process", bguid)
        return self._sealer.open(kind, data, bguid)

    def absorb(self, other: "MemoryBlockAccess") -> None:
        """Take every block of ``other`` (two partitions' stores healing)."""
        self.blocks.update(other.blocks)
