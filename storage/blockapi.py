"""The interface through which objects and logs store their bytes.

Higher storage layers (``objects``, ``logs``) see blocks as *plaintext of a
kind*: they never handle sealing, replica placement or verification. A
:class:`BlockAccess` turns plaintext into an immutable, encrypted,
content-addressed block and back:

* ``put`` seals the plaintext with the volume's key (``storage.seal``), names
  it by the BGUID of the sealed bytes, and returns once the block is durable
  (stored on r holders for the replicated implementation, in LMDB for the
  local one). Putting the same plaintext of the same kind in the same volume
  twice gives the same BGUID (convergent sealing), so it is idempotent.
* ``get`` fetches the sealed bytes by BGUID, checks them against the BGUID,
  opens them (checking the kind) and returns the plaintext, or raises a
  ``storage.errors`` error: ``BlockNotFound`` when no holder has it,
  ``BlockCorrupt`` when every copy found failed verification.

Implementations: a node-local one over a single LMDB block store (r = 1; used
by single-node volumes and by unit tests of the layers above), and the
replicated one over the Tapestry overlay.
"""

from __future__ import annotations

import abc
from enum import IntEnum

MAX_BLOCK = 64 * 1024  # bytes of plaintext in one data block


class Kind(IntEnum):
    """What a block holds. Sealed into the block's authenticated header, so a
    block of one kind can never be read as another."""

    DATA = 1        # file data
    INDIRECT = 2    # a list of BGUIDs of a file's block tree
    ROOT = 3        # an object version's root block (size, times, tree)
    RECORD = 4      # an Ivy log record
    SNAPSHOT = 5    # a snapshot's inode table page
    META = 6        # anything else small (views, descriptors)


class BlockAccess(abc.ABC):
    """Plaintext blocks of one volume, content-addressed and durable."""

    @abc.abstractmethod
    async def put(self, kind: Kind, plaintext: bytes) -> bytes:
        """Store a block; return its BGUID once durable."""

    async def put_many(self, items: list[tuple[Kind, bytes]]) -> list[bytes]:
        """Store several blocks, pipelined; BGUIDs in the same order."""
        return [await self.put(k, p) for k, p in items]

    def name_of(self, kind: Kind, plaintext: bytes) -> bytes | None:
        """The BGUID ``put(kind, plaintext)`` will return, computed without
        storing anything (sealing is convergent); None when this access
        cannot tell in advance."""
        return None

    @abc.abstractmethod
    async def get(self, bguid: bytes, kind: Kind) -> bytes:
        """Fetch, verify and open a block."""

    async def get_many(self, items: list[tuple[bytes, Kind]]) -> list[bytes]:
        """Fetch several blocks, pipelined; plaintexts in the same order."""
        return [await self.get(b, k) for b, k in items]
