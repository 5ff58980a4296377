"""Errors of the storage layer, each named where it arises.

One base, :class:`StorageError`, which the CLI and the FUSE module catch once
and map to an exit code or an errno. Wire errors (``overlay.wire.transport``
``PeerError``, ``RemoteError``) are translated into these at exactly one
boundary per service (for blocks: ``storage.blockservice``), so code above
never has to look at a refusal code string.

Add new errors here, grouped by the module that raises them, each with a
docstring saying when it happens and whose fault it is.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error the storage layer raises on purpose."""


# --------------------------------------------------------------------------
# Blocks (storage.blockstore, storage.seal, storage.blockservice)


class BlockError(StorageError):
    """Something is wrong with one block. ``bguid`` names it when known;
    ``peer_id`` names the node that served or refused it, when remote."""

    def __init__(self, msg: str, bguid: bytes | None = None, peer_id: bytes | None = None):
        super().__init__(msg)
        self.bguid = bguid
        self.peer_id = peer_id


class BlockNotFound(BlockError):
    """No block with this BGUID is stored here (or on the peer asked). Not a
    fault of anyone by itself: try another holder."""


class BlockCorrupt(BlockError):
    """The bytes fail an integrity check: they do not hash to the BGUID they
    are stored or served under, or their AEAD tag does not verify (tampered
    bytes, or a key other than the one they were sealed with). A corrupt block
    is never returned: a store quarantines it, a client discards it and tries
    another holder."""


class BadBlock(BlockError):
    """The bytes are intact as far as we can tell but are not a block this
    code may open as asked: not a sealed block (bad magic, too short), a
    format version we do not know, an unknown kind, or a kind other than the
    one the caller expected (a block cannot be reinterpreted as another kind)."""


class BlockTooLarge(BlockError):
    """A block larger than the maximum was offered: plaintext over
    ``blockapi.MAX_BLOCK`` to ``seal``, or stored bytes over the store's
    ``max_block``. The caller must split its data."""


class BlockTombstoned(BlockError):
    """A put of a BGUID that was deleted (collected) here was refused: a stale
    replica must not resurrect a collected block. A writer that references
    the same content again revives it explicitly (``revive=True``)."""


class StoreFull(StorageError):
    """A block store refused a put: its quota would be exceeded, the disk
    under it has too little free space, or LMDB's map cannot grow further.
    Nothing of the refused put (or batch) was stored; retry elsewhere.
    ``peer_id`` names the node when the store was remote."""

    def __init__(self, msg: str, peer_id: bytes | None = None):
        super().__init__(msg)
        self.peer_id = peer_id


class HolderRefused(StorageError):
    """A block holder refused a request for a reason of its own, not the
    block's: its store is closed or failing, or it does not serve blocks.
    ``code`` is the refusal code it sent. Try another holder."""

    def __init__(self, msg: str, code: str, peer_id: bytes | None = None):
        super().__init__(msg)
        self.code = code
        self.peer_id = peer_id


class StoreFormatError(StorageError):
    """A block store's files are of a format version this code does not
    know, or are not a block store at all. Nothing was changed on disk."""


class StoreEntryDamaged(StorageError):
    """An entry in a block store's LMDB does not decode, or contradicts
    the entries it must agree with. Examples: a stamp, tombstone or counter
    of the wrong length, a time that is not a finite number, a stamp that
    gives a length no block here can have, or counters that do not match
    their check record. LMDB keeps no checksums, so damage to the disk or a
    stray write shows up here. The node is not at fault, and neither is any
    peer. ``db`` and ``key`` name the entry. The store recovers what it can
    (see the ``storage.blockstore_repair`` docstring). Only a call about exactly
    that entry (``stored_at``, ``tombstone``) raises this. So does any call
    whose counters are found damaged again straight after a recount."""

    def __init__(self, msg: str, db: str, key: bytes):
        super().__init__(msg)
        self.db = db
        self.key = key


class StoreClosed(StorageError):
    """The block store was used after ``close()`` (a bug in the caller's
    shutdown order)."""


# --------------------------------------------------------------------------
# Replication (storage.replication, storage.placement)


class TooFewHolders(StorageError):
    """A replicated put could not reach its write quorum of distinct holders:
    too few live nodes that store blocks were reachable through the overlay
    (a network smaller than r, or a partition), and none of the missing ones
    was merely full (that is StoreFull). Copies already made stay; retry once
    more nodes are up."""

    def __init__(self, msg: str, bguid: bytes | None = None):
        super().__init__(msg)
        self.bguid = bguid
