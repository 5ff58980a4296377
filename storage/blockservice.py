"""Block RPCs: what a node serves from its block store, and the client side.

DESIGN.md "storage/blocks" (put stores replicas on holders; get fetches,
verifies and falls back) and "What must always hold" (nothing is trusted
that was not checked: block bytes against their BGUID). This module is the
node-to-node half; choosing holders through the overlay is done above it.

Messages, all over :class:`overlay.wire.transport.Transport`::

    blk.store  {blocks: [{g, d}], revive: bool} -> {stored: int}
    blk.fetch  {bguids: [g]}        -> {blocks: [{g, d}], missing: [g]}
    blk.has    {bguids: [g]}        -> {have: [bool]}
    blk.list   {after: g|nil, limit} -> {bguids: [g], more: bool}
    blk.stat   {}                   -> {blocks, bytes, free}
    blk.check  {bguids: [g]}        -> {state: [0|1|2], at: [float|nil], epoch: [int]}
    blk.delete {bguids: [g], epoch, spare_within: float|nil} -> {deleted: [g]}

``blk.check`` reports, per BGUID, absent (0), held (1, with its stored_at)
or tombstoned (2, with its deleted_at and the collector's epoch): replica
repair compares these across holders (``storage.maintenance``). ``blk.delete`` is the collector's
sweep (``storage.gc``): it is refused (``not_authorised``) unless the sender
is one of the NodeIDs the service was given as ``collectors``.

``g`` is a 32-byte BGUID, ``d`` a block of at most ``seal.MAX_SEALED``
bytes. A ``blk.store`` request is applied atomically (the store's
``put_many``): all of its blocks or none. The holder verifies each block
against its BGUID before storing, and again on every read; a copy that fails
is quarantined and reported missing, never served.

Sizes: every request and reply fits the frame cap (8 MiB). The client splits
stores into batches of at most ``MAX_BATCH_BYTES`` and ``MAX_STORE_BLOCKS``,
and fetches into requests of at most ``MAX_FETCH`` BGUIDs, few enough that
the reply fits even if every block is of maximal size. Batches are sent one
after the other; each is atomic, the sequence is not (a failure leaves the
earlier batches stored, which is harmless: puts are idempotent).

Errors are translated here, once. A holder refuses with a code; the client
raises the storage error it stands for:

    store_full -> StoreFull          tombstoned -> BlockTombstoned
    corrupt    -> BlockCorrupt       too_large  -> BlockTooLarge
    not_found  -> BlockNotFound      any other  -> HolderRefused(code)

A fetched block that does not hash to its BGUID (a faulty or malicious
holder), or that was not asked for, raises BlockCorrupt naming the peer, and
nothing of that reply is returned. Transport failures (``PeerError``:
unreachable, timeout, authentication, protocol) pass through unchanged;
callers try another holder.

Hashing: the holder's store does its hashing in a worker thread
(``AsyncBlockStore``); the client verifies replies larger than
``OFFLOAD_BYTES`` in a worker thread too, unless told not to (``offload=False``
for simulations on virtual time, see ``AsyncBlockStore``).

Not here yet: who may store (any authenticated node may, within the quota).
Deletes are authorised by NodeID only (the ``collectors`` allow-list); a
capability from the volume layer will replace it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from typing import Iterable, Mapping

import trio

from overlay.wire import frames
from overlay.wire.frames import GUID, Bytes, Int, ListOf, Nullable
from overlay.wire.ids import short
from overlay.wire.transport import DEFAULT_TIMEOUT, Dispatcher, Peer, Refused, RemoteError, Transport

from .blockstore import AsyncBlockStore, BlockStore
from .errors import (
    BlockCorrupt,
    BlockError,
    BlockNotFound,
    BlockTombstoned,
    BlockTooLarge,
    HolderRefused,
    StorageError,
    StoreFull,
)
from .seal import MAX_SEALED

log = logging.getLogger(__name__)

_ITEM_OVERHEAD = 64  # msgpack bytes around one {g, d} entry, generously
MAX_BATCH_BYTES = frames.DEFAULT_MAX_FRAME - (64 << 10)  # slack for envelope and lists
MAX_STORE_BLOCKS = 4096
MAX_FETCH = MAX_BATCH_BYTES // (MAX_SEALED + _ITEM_OVERHEAD)  # 126 maximal blocks
MAX_LIST = 4096
OFFLOAD_BYTES = 256 << 10

_BLOCK = {"g": GUID, "d": Bytes(max=MAX_SEALED)}

STORE = frames.message(
    "blk.store",
    request={"blocks": ListOf(_BLOCK, max=MAX_STORE_BLOCKS), "revive": bool},
    reply={"stored": Int(0, MAX_STORE_BLOCKS)},
)
FETCH = frames.message(
    "blk.fetch",
    request={"bguids": ListOf(GUID, max=MAX_FETCH)},
    reply={"blocks": ListOf(_BLOCK, max=MAX_FETCH), "missing": ListOf(GUID, max=MAX_FETCH)},
)
HAS = frames.message(
    "blk.has",
    request={"bguids": ListOf(GUID, max=MAX_LIST)},
    reply={"have": ListOf(bool, max=MAX_LIST)},
)
LIST = frames.message(
    "blk.list",
    request={"after": Nullable(GUID), "limit": Int(1, MAX_LIST)},
    reply={"bguids": ListOf(GUID, max=MAX_LIST), "more": bool},
)
STAT = frames.message(
    "blk.stat",
    request={},
    reply={"blocks": Int(0), "bytes": Int(0), "free": Int(0)},
)
CHECK = frames.message(
    "blk.check",
    request={"bguids": ListOf(GUID, max=MAX_LIST)},
    reply={"state": ListOf(Int(0, 2), max=MAX_LIST), "at": ListOf(Nullable(float), max=MAX_LIST),
           "epoch": ListOf(Int(0, 2**63 - 1), max=MAX_LIST)},
)
DELETE = frames.message(
    "blk.delete",
    request={"bguids": ListOf(GUID, max=MAX_LIST), "epoch": Int(0, 2**63 - 1),
             "spare_within": Nullable(float)},
    reply={"deleted": ListOf(GUID, max=MAX_LIST)},
)

# Refusal codes, both ways. BlockError subclasses carry the BGUID in the
# message as "bguid=<hex>" so the client can name the block again.
_CODE_OF: list[tuple[type[StorageError], str]] = [
    (StoreFull, "store_full"),
    (BlockTombstoned, "tombstoned"),
    (BlockCorrupt, "corrupt"),
    (BlockTooLarge, "too_large"),
    (BlockNotFound, "not_found"),
]
_ERROR_OF = {code: cls for cls, code in _CODE_OF}
_BGUID_IN_MSG = re.compile(r"bguid=([0-9a-f]{64})")


# --------------------------------------------------------------------------
# Server


class BlockService:
    """The ``blk.*`` handlers of one node over its block store. Register them
    on the node's dispatcher with :meth:`register`."""

    def __init__(self, store: BlockStore | AsyncBlockStore, *,
                 collectors: Iterable[bytes] = ()):
        self.store = store if isinstance(store, AsyncBlockStore) else AsyncBlockStore(store)
        self.collectors = frozenset(collectors)   # NodeIDs whose blk.delete is obeyed

    def register(self, dispatcher: Dispatcher) -> None:
        dispatcher.on(STORE, self.on_store, quick=self._store_is_quick)
        dispatcher.on(FETCH, self.on_fetch)
        dispatcher.on(HAS, self.on_has)
        dispatcher.on(LIST, self.on_list)
        dispatcher.on(STAT, self.on_stat)
        dispatcher.on(CHECK, self.on_check)
        dispatcher.on(DELETE, self.on_delete)

    def _store_is_quick(self, body: dict) -> bool:
        """A put small enough for the store to take on the trio thread
        (``AsyncBlockStore.put_many``: staged, no worker thread)."""
        return sum(len(b["d"]) for b in body["blocks"]) < self.store.inline_below

    async def on_store(self, sender: bytes, body: dict) -> dict:
        items = [(b["g"], b["d"]) for b in body["blocks"]]
        try:
            n = await self.store.put_many(items, revive=body["revive"])
        except StorageError as e:
            log.info("refused %d blocks from %s: %s", len(items), short(sender), e)
            raise _refusal(e) from None
        return {"stored": n}

    async def on_fetch(self, sender: bytes, body: dict) -> dict:
        want = body["bguids"]
        try:
            found = await self.store.get_many(want)
        except StorageError as e:
            raise _refusal(e) from None
        blocks = [{"g": g, "d": d} for g, d in found.items() if len(d) <= MAX_SEALED]
        served = {b["g"] for b in blocks}
        return {"blocks": blocks, "missing": [g for g in dict.fromkeys(want) if g not in served]}

    async def on_has(self, sender: bytes, body: dict) -> dict:
        try:
            return {"have": await self.store.has_many(body["bguids"])}
        except StorageError as e:
            raise _refusal(e) from None

    async def on_list(self, sender: bytes, body: dict) -> dict:
        limit = body["limit"]
        try:
            page = await self.store.list_bguids(body["after"], limit + 1)
        except StorageError as e:
            raise _refusal(e) from None
        return {"bguids": page[:limit], "more": len(page) > limit}

    async def on_stat(self, sender: bytes, body: dict) -> dict:
        try:
            s = await self.store.stats()
        except StorageError as e:
            raise _refusal(e) from None
        return {"blocks": s.blocks, "bytes": s.bytes, "free": s.free}


    async def on_check(self, sender: bytes, body: dict) -> dict:
        try:
            states = await self.store.states(body["bguids"])
        except StorageError as e:
            raise _refusal(e) from None
        return {"state": [s for s, _, _ in states], "at": [t for _, t, _ in states],
                "epoch": [e for _, _, e in states]}

    async def on_delete(self, sender: bytes, body: dict) -> dict:
        if sender not in self.collectors:
            raise Refused("not_authorised", f"{short(sender)} may not delete blocks here")
        age = body["spare_within"]
        if age is not None and not (math.isfinite(age) and age >= 0):
            raise Refused("bad_request", "spare_within must be a finite age in seconds")
        try:
            gone = await self.store.delete_many(body["bguids"], epoch=body["epoch"],
                                                spare_within=age)
        except StorageError as e:
            raise _refusal(e) from None
        return {"deleted": gone}


def _refusal(e: StorageError) -> Refused:
    code = next((c for cls, c in _CODE_OF if isinstance(e, cls)), "storage_error")
    msg = str(e)
    if isinstance(e, BlockError) and e.bguid is not None:
        msg = f"{msg} (bguid={e.bguid.hex()})"
    return Refused(code, msg)


# --------------------------------------------------------------------------
# Client


async def put_to(transport: Transport, peer: Peer,
                 blocks: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]], *,
                 revive: bool = False, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Store blocks (BGUID -> sealed bytes) on ``peer``; returns how many it
    did not hold before. Raises StoreFull, BlockTombstoned, BlockCorrupt
    (bytes that do not hash to their BGUID), BlockTooLarge, HolderRefused,
    or a transport PeerError."""
    items = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
    for g, d in items:
        if len(d) > MAX_SEALED:
            raise BlockTooLarge(f"block of {len(d)} bytes exceeds {MAX_SEALED}", g)
    stored = 0
    for batch in _store_batches(items):
        body = {"blocks": [{"g": g, "d": bytes(d)} for g, d in batch], "revive": revive}
        reply = await _call(transport, peer, STORE, body, timeout)
        stored += reply["stored"]
    return stored


async def get_from(transport: Transport, peer: Peer, bguids: Iterable[bytes], *,
                   timeout: float = DEFAULT_TIMEOUT, offload: bool = True) -> dict[bytes, bytes]:
    """Fetch blocks from ``peer``: the verified ones it holds, by BGUID.
    Blocks it does not hold are left out (ask another holder). Raises
    BlockCorrupt, naming the peer, if it answers bytes that do not match
    their BGUID or a block not asked for; nothing of that reply is returned."""
    want = list(dict.fromkeys(bguids))
    out: dict[bytes, bytes] = {}
    for i in range(0, len(want), MAX_FETCH):
        chunk = want[i:i + MAX_FETCH]
        reply = await _call(transport, peer, FETCH, {"bguids": chunk}, timeout)
        got = [(b["g"], b["d"]) for b in reply["blocks"]]
        asked = set(chunk)
        for g, _ in got:
            if g not in asked:
                raise BlockCorrupt(f"peer {short(peer.id)} answered block {g.hex()[:16]} "
                                   "that was not asked for", g, peer.id)
        if offload and sum(len(d) for _, d in got) > OFFLOAD_BYTES:
            bad = await trio.to_thread.run_sync(_first_forged, got)
        else:
            bad = _first_forged(got)
        if bad is not None:
            log.warning("peer %s served forged bytes for block %s", short(peer.id), bad.hex()[:16])
            raise BlockCorrupt(f"peer {short(peer.id)} served bytes that do not hash to "
                               f"block {bad.hex()[:16]}", bad, peer.id)
        out.update(got)
    return out


async def get_one_from(transport: Transport, peer: Peer, bguid: bytes, *,
                       timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """One verified block from ``peer``; BlockNotFound if it has none."""
    found = await get_from(transport, peer, [bguid], timeout=timeout, offload=False)
    try:
        return found[bguid]
    except KeyError:
        raise BlockNotFound(f"peer {short(peer.id)} does not hold block {bguid.hex()[:16]}",
                            bguid, peer.id) from None


async def has_on(transport: Transport, peer: Peer, bguids: Iterable[bytes], *,
                 timeout: float = DEFAULT_TIMEOUT) -> dict[bytes, bool]:
    """Which of ``bguids`` the peer holds (by its word: not verified)."""
    want = list(dict.fromkeys(bguids))
    out: dict[bytes, bool] = {}
    for i in range(0, len(want), MAX_LIST):
        chunk = want[i:i + MAX_LIST]
        reply = await _call(transport, peer, HAS, {"bguids": chunk}, timeout)
        if len(reply["have"]) != len(chunk):
            raise HolderRefused(f"peer {short(peer.id)} answered {len(reply['have'])} "
                                f"flags for {len(chunk)} blocks", "bad_reply", peer.id)
        out.update(zip(chunk, reply["have"]))
    return out


async def list_on(transport: Transport, peer: Peer, after: bytes | None = None,
                  limit: int = MAX_LIST, *, timeout: float = DEFAULT_TIMEOUT
                  ) -> tuple[list[bytes], bool]:
    """A page of the BGUIDs ``peer`` holds after ``after``, and whether more follow."""
    reply = await _call(transport, peer, LIST, {"after": after, "limit": limit}, timeout)
    return reply["bguids"], reply["more"]


async def stat_of(transport: Transport, peer: Peer, *,
                  timeout: float = DEFAULT_TIMEOUT) -> dict[str, int]:
    """The peer's block count, payload bytes and free quota."""
    return await _call(transport, peer, STAT, {}, timeout)


async def check_on(transport: Transport, peer: Peer, bguids: Iterable[bytes], *,
                   timeout: float = DEFAULT_TIMEOUT) -> dict[bytes, tuple[int, float | None, int]]:
    """Per BGUID, the peer's (state, time, epoch): ``blockstore.ABSENT``,
    ``HELD`` with stored_at, or ``TOMBSTONED`` with deleted_at and the
    collector's epoch (by its word: not verified)."""
    want = list(dict.fromkeys(bguids))
    out: dict[bytes, tuple[int, float | None, int]] = {}
    for i in range(0, len(want), MAX_LIST):
        chunk = want[i:i + MAX_LIST]
        reply = await _call(transport, peer, CHECK, {"bguids": chunk}, timeout)
        if not len(reply["state"]) == len(reply["at"]) == len(reply["epoch"]) == len(chunk):
            raise HolderRefused(f"peer {short(peer.id)} answered {len(reply['state'])} "
                                f"states for {len(chunk)} blocks", "bad_reply", peer.id)
        out.update(zip(chunk, zip(reply["state"], reply["at"], reply["epoch"])))
    return out


async def delete_on(transport: Transport, peer: Peer, bguids: Iterable[bytes], *, epoch: int,
                    spare_within: float | None,
                    timeout: float = DEFAULT_TIMEOUT) -> list[bytes]:
    """Ask ``peer`` to delete (and tombstone) blocks, sparing those it stored
    in the last ``spare_within`` seconds by its own clock (an age, so that
    clocks need not agree); returns the ones it removed.
    HolderRefused(code "not_authorised") unless we are one of its collectors."""
    want = list(dict.fromkeys(bguids))
    gone: list[bytes] = []
    for i in range(0, len(want), MAX_LIST):
        body = {"bguids": want[i:i + MAX_LIST], "epoch": epoch,
                "spare_within": spare_within}
        reply = await _call(transport, peer, DELETE, body, timeout)
        gone += reply["deleted"]
    return gone


async def _call(transport: Transport, peer: Peer, msg_type: str, body: dict,
                timeout: float) -> dict:
    try:
        return await transport.request(peer, msg_type, body, timeout=timeout)
    except RemoteError as e:
        raise _from_remote(e, peer) from e


def _from_remote(e: RemoteError, peer: Peer) -> StorageError:
    """The storage error a holder's refusal stands for."""
    msg = f"peer {short(peer.id)}: {e.msg}"
    cls = _ERROR_OF.get(e.code)
    if cls is None:
        return HolderRefused(msg, e.code, peer.id)
    if cls is StoreFull:
        return StoreFull(msg, peer.id)
    m = _BGUID_IN_MSG.search(e.msg)
    return cls(msg, bytes.fromhex(m.group(1)) if m else None, peer.id)


def _store_batches(items: list[tuple[bytes, bytes]]) -> Iterable[list[tuple[bytes, bytes]]]:
    batch: list[tuple[bytes, bytes]] = []
    size = 0
    for g, d in items:
        cost = len(d) + _ITEM_OVERHEAD
        if batch and (size + cost > MAX_BATCH_BYTES or len(batch) == MAX_STORE_BLOCKS):
            yield batch
            batch, size = [], 0
        batch.append((g, d))
        size += cost
    if batch:
        yield batch


def _first_forged(blocks: list[tuple[bytes, bytes]]) -> bytes | None:
    for g, d in blocks:
        if hashlib.sha256(d).digest() != g:
            return g
    return None
