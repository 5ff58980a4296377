"""Writers' logs and their signed log-heads (Ivy, OSDI 2002, sections 2-3;
DESIGN.md "storage/logs").

A writer appends records (``storage.records``) to its own log only. Records
are group-committed: ``Log.append`` only queues, and ``Log.commit`` packs the
queue into ``Kind.RECORD`` blocks of at most ``MAX_BLOCK`` bytes, each
naming the block before it (``prev``), so the log is a hash chain read
newest-first. Nothing is visible to others until a new *log-head* is
published: the writer's id, its newest seq and block, the version vector of
everything it has seen (its promise: every later record of it sees at least
that), a publish counter ``n``, its latest snapshot, all signed with the
writer's Ed25519 key. A head is valid inside a partition on the writer's
signature alone, as in Ivy; the inner ring certifies heads when reachable
(``HeadBoard`` is the hook where the lead plugs that in).

A :class:`LogReader` checks what storage hands it, because storage is not
trusted (Ivy's known weakness, closed here):

* a head must verify under the writer's key from the view, for this volume;
* **rollback**: a head older than one already accepted (smaller ``n`` or
  ``seq``, or a vector that shrank) raises :class:`LogRolledBack`;
* **fork**: two heads with the same ``n`` (or the same seq) and different
  contents, or a log whose chain no longer passes through the block holding
  the last record already read, raises :class:`LogForked`;
* every block must decode strictly, belong to this volume and writer, and
  continue the chain with consecutive seqs and vectors that never shrink
  (:class:`LogCorrupt`).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

import msgpack

from overlay.wire import frames
from overlay.wire.frames import FrameError
from overlay.wire.ids import BadSignature, Identity, node_id_of, verify

from .blockapi import BlockAccess, Kind
from .errors import StorageError
from .records import (MAX_WRITERS, Body, End, LogBlock, Op, Record, RecordError, Write,
                      decode_block, encode_block_prefix, make_record)
from .vv import EMPTY, MAX_SEQ, VV

HEAD_VERSION = 1
HEAD_CONTEXT = b"p2pfs log-head v1\0"
MAX_HEAD_BYTES = 8 + 64 * 3 + MAX_WRITERS * 48


class LogError(StorageError):
    """Base of the errors a log reader raises about one writer's log.
    ``writer`` names the writer whose log is at fault."""

    def __init__(self, msg: str, writer: bytes | None = None):
        super().__init__(msg)
        self.writer = writer


class BadLogHead(LogError):
    """A log-head is malformed, for another volume or writer, or its
    signature does not verify under the writer's key from the view."""


class LogRolledBack(LogError):
    """Storage served a log-head older than one this reader already accepted
    (a stale or replayed head: Ivy's rollback attack)."""


class LogForked(LogError):
    """The writer's log has two different histories: two heads with the same
    publish counter or seq and different contents, or a chain that no longer
    passes through the block already read. The writer equivocated (or its key
    is compromised)."""


class LogCorrupt(LogError):
    """A log block fails to decode, belongs to another volume or writer, or
    breaks the chain (seq gap, vector going backwards, first record not End)."""


# --------------------------------------------------------------------------
# Log-heads

_HEAD_SCHEMA = frames.Struct({
    "v": frames.Int(HEAD_VERSION, HEAD_VERSION), "vol": frames.GUID, "w": frames.GUID,
    "seq": frames.Int(0, MAX_SEQ), "blk": frames.Nullable(frames.GUID),
    "vv": frames.ListOf(frames.ListOf(frames.AnyValue(), max=2), max=MAX_WRITERS),
    "n": frames.Int(1, MAX_SEQ), "t": frames.Int(-(2**63), 2**63 - 1),
    "snap": frames.Nullable(frames.GUID), "sig": frames.SIG,
})


@dataclass(frozen=True, slots=True)
class LogHead:
    """A writer's signed pointer to the newest block of its log."""

    volume: bytes
    writer: bytes
    seq: int
    block: bytes | None
    vv: VV
    n: int
    time: int
    snap: bytes | None
    sig: bytes

    def _fields(self) -> dict:
        return {"v": HEAD_VERSION, "vol": self.volume, "w": self.writer, "seq": self.seq,
                "blk": self.block, "vv": [[w, s] for w, s in self.vv.sorted_items()],
                "n": self.n, "t": self.time, "snap": self.snap}

    def signed_bytes(self) -> bytes:
        return HEAD_CONTEXT + msgpack.packb(self._fields(), use_bin_type=True)

    @classmethod
    def make(cls, identity: Identity, volume: bytes, seq: int, block: bytes | None, vv: VV,
             n: int, *, time_ns: int, snap: bytes | None = None) -> "LogHead":
        unsigned = cls(volume, identity.id, seq, block, vv, n, time_ns, snap, b"")
        unsigned._check()
        return cls(volume, identity.id, seq, block, vv, n, time_ns, snap,
                   identity.sign(unsigned.signed_bytes()))

    def _check(self) -> None:
        if self.vv[self.writer] != self.seq:
            raise BadLogHead("a head's own vector entry must be its seq", self.writer)
        if (self.seq == 0) != (self.block is None):
            raise BadLogHead("a head names a block exactly when its log is not empty",
                             self.writer)

    def encode(self) -> bytes:
        d = self._fields()
        d["sig"] = self.sig
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> "LogHead":
        """Parse a head strictly (the signature is checked by ``verify``)."""
        if type(raw) is not bytes or len(raw) > MAX_HEAD_BYTES:
            raise BadLogHead("a log-head is a bounded byte string")
        try:
            d = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
            _HEAD_SCHEMA.check(d, "log-head")
            vv = _vv_of(d["vv"])
        except (FrameError, BadLogHead):
            raise
        except Exception as e:
            raise BadLogHead(f"log-head is not msgpack: {type(e).__name__}") from None
        head = cls(d["vol"], d["w"], d["seq"], d["blk"], vv, d["n"], d["t"], d["snap"],
                   d["sig"])
        head._check()
        return head

    def verify(self, public_key: bytes, volume: bytes) -> None:
        """Check this head is ``public_key``'s, for ``volume``, and signed."""
        if node_id_of(public_key) != self.writer:
            raise BadLogHead("head names a writer other than the key given", self.writer)
        if self.volume != volume:
            raise BadLogHead("head belongs to another volume", self.writer)
        try:
            verify(public_key, self.sig, self.signed_bytes())
        except BadSignature:
            raise BadLogHead("log-head signature does not verify", self.writer) from None


def decode_head(raw: bytes) -> LogHead:
    """``LogHead.decode`` with every failure as :class:`BadLogHead`."""
    try:
        return LogHead.decode(raw)
    except FrameError as e:
        raise BadLogHead(f"malformed log-head: {e}") from None


def _vv_of(lst: list) -> VV:
    out, last = {}, None
    for e in lst:
        if (len(e) != 2 or type(e[0]) is not bytes or len(e[0]) != 32 or type(e[1]) is not int
                or not 1 <= e[1] <= MAX_SEQ or (last is not None and e[0] <= last)):
            raise BadLogHead("bad version vector in log-head")
        last = e[0]
        out[e[0]] = e[1]
    return VV(out)


def _no_ext(code, data):
    raise BadLogHead("msgpack extension types are not allowed")


class HeadBoard(abc.ABC):
    """Where log-heads are published and fetched.

    The hook for the inner ring: ``publish`` is where a head gets certified
    (the ring orders and signs it; a partitioned writer falls back to its
    own signature), ``fetch`` where the newest certified heads are read.
    Implementations store and return encoded heads; readers decode and
    check them, since a board is not trusted.
    """

    @abc.abstractmethod
    async def publish(self, head: LogHead) -> None:
        """Make ``head`` the writer's current head (durable on return)."""

    @abc.abstractmethod
    async def fetch(self, writers: list[bytes]) -> dict[bytes, bytes]:
        """The newest encoded head of each writer that has one."""

    async def settle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for work a board does in the background
        after ``publish`` (certification); True when nothing is left."""
        return True

    # Write-ahead heads (``Session`` uses them when ``journals`` is true): a
    # close makes its new head durable locally *while* the record blocks it
    # names are being stored, instead of after. The head is kept with those
    # blocks' plaintexts (the journal) in one durable write, so a crash
    # between the two is repaired at the next mount by storing the journal
    # again (sealing is convergent: same bytes, same BGUIDs); and nobody else
    # is shown the head (``release``) before its blocks are stored.
    journals = False

    async def publish_ahead(self, head: LogHead, journal: list[tuple[int, bytes]]) -> None:
        """Make ``head`` durable for its writer together with ``journal``
        ([(kind, plaintext)]: the blocks it names, directly or through its
        records, that may not be stored yet), without showing it to others."""
        raise NotImplementedError("this board keeps no journal")

    async def release(self, head: LogHead) -> None:
        """The blocks ``head`` names are stored: show it (as ``publish``
        does after its durable write)."""

    async def journal(self, writer: bytes) -> list[tuple[int, bytes]]:
        """The journal kept with ``writer``'s newest head (empty if none)."""
        return []

    async def flush(self) -> None:
        """Make every head published here durable against a machine crash
        too (fsync(2)); boards whose publish is that durable on return have
        nothing to do."""


class MemoryHeadBoard(HeadBoard):
    """An in-process board for single-process tests: a dict of encoded heads.
    Tests model partitions with several boards (``absorb`` heals them) and
    a lying store by writing ``heads`` directly."""

    def __init__(self):
        self.heads: dict[bytes, bytes] = {}
        self.publishes = 0

    async def publish(self, head: LogHead) -> None:
        self.publishes += 1
        self.heads[head.writer] = head.encode()

    async def fetch(self, writers: list[bytes]) -> dict[bytes, bytes]:
        return {w: self.heads[w] for w in writers if w in self.heads}

    def absorb(self, other: "MemoryHeadBoard") -> None:
        """Keep, per writer, the head with the larger publish counter."""
        for w, raw in other.heads.items():
            mine = self.heads.get(w)
            if mine is None or decode_head(raw).n > decode_head(mine).n:
                self.heads[w] = raw


# --------------------------------------------------------------------------
# Writing


class Log:
    """One writer's log: queue, group-commit, sign heads."""

    def __init__(self, volume: bytes, identity: Identity, blocks: BlockAccess, *,
                 head: LogHead | None = None, clock=time.time_ns):
        self.volume = volume
        self.identity = identity
        self.writer = identity.id
        self.blocks = blocks
        self.clock = clock
        self.seq = head.seq if head else 0          # last seq assigned
        self.committed = self.seq                   # last seq in a stored block
        self.block = head.block if head else None   # newest stored block
        self.n = head.n if head else 0              # publish counter
        self.snap = head.snap if head else None
        self.pending: list[Record] = []
        self.pending_bytes = 0
        self.blocks_written: list[tuple[int, int, bytes]] = []  # (first, last, bguid)
        self.last_vv = head.vv if head else EMPTY

    def append(self, knowledge: VV, body: Body) -> Record:
        """Queue a record; ``knowledge`` is what this writer has seen."""
        if self.seq == 0 and body.OP != Op.END:
            raise ValueError("a log starts with its End record")
        rec = make_record(self.writer, self.seq + 1, knowledge.merge(self.last_vv),
                          self.clock(), body)
        self.seq += 1
        self.last_vv = rec.vv
        self.pending.append(rec)
        inline = body.data if isinstance(body, Write) and body.data else b""
        self.pending_bytes += 96 + len(inline)
        return rec

    def start(self, knowledge: VV = EMPTY) -> Record:
        """The End record that opens a new log (``knowledge``: what the
        writer has read before it starts writing)."""
        return self.append(knowledge, End(self.volume))

    async def commit(self) -> int:
        """Store every queued record in blocks; returns how many blocks."""
        count = 0
        while self.pending:
            raw, take = encode_block_prefix(self.volume, self.writer, self.block, self.pending)
            g = await self.blocks.put(Kind.RECORD, raw)
            first, last = self.pending[0].seq, self.pending[take - 1].seq
            self.blocks_written.append((first, last, g))
            self.block, self.committed = g, last
            del self.pending[:take]
            count += 1
        self.pending_bytes = 0
        return count

    def prepare(self, name_of) -> list[tuple[bytes, int, int, bytes]] | None:
        """Encode the queued records into blocks exactly as ``commit``
        would, naming each by ``name_of(kind, raw)`` (the BGUID a put will
        return) instead of storing it: [(raw, first seq, last seq, BGUID)].
        Changes nothing; None when ``name_of`` cannot name a block."""
        out: list[tuple[bytes, int, int, bytes]] = []
        block, i = self.block, 0
        while i < len(self.pending):
            raw, take = encode_block_prefix(self.volume, self.writer, block, self.pending[i:])
            g = name_of(Kind.RECORD, raw)
            if g is None:
                return None
            out.append((raw, self.pending[i].seq, self.pending[i + take - 1].seq, g))
            block, i = g, i + take
        return out

    def adopt(self, prepared: list[tuple[bytes, int, int, bytes]]) -> None:
        """Take the blocks of ``prepare`` as this log's committed blocks
        (every queued record; the caller stores them)."""
        for _raw, first, last, g in prepared:
            self.blocks_written.append((first, last, g))
            self.block, self.committed = g, last
        self.pending.clear()
        self.pending_bytes = 0

    def make_head(self, knowledge: VV, *, snap: bytes | None = None) -> LogHead:
        """A new signed head for everything committed; ``knowledge`` is the
        writer's promise. Call only with nothing queued (a head must cover
        every record written before it, or the promise would be false)."""
        if self.pending:
            raise ValueError("commit before making a head")
        if snap is not None:
            self.snap = snap
        self.n += 1
        vv = knowledge.merge(self.last_vv).with_entry(self.writer, self.committed)
        return LogHead.make(self.identity, self.volume, self.committed, self.block, vv,
                            self.n, time_ns=self.clock(), snap=self.snap)


# --------------------------------------------------------------------------
# Reading


@dataclass(slots=True)
class Position:
    """How far a reader has read one writer's log."""

    seq: int = 0
    block: bytes | None = None     # the block holding record ``seq``, when known
    vv: VV = EMPTY                 # the vector of record ``seq``


class LogReader:
    """Reads other writers' logs from their heads back to what it has."""

    def __init__(self, volume: bytes, blocks: BlockAccess):
        self.volume = volume
        self.blocks = blocks
        self.pos: dict[bytes, Position] = {}
        self.heads: dict[bytes, LogHead] = {}
        self.block_index: dict[bytes, list[tuple[int, int, bytes]]] = {}
        self.records_fetched = 0     # new records returned
        self.blocks_fetched = 0

    def start_at(self, writer: bytes, seq: int, block: bytes | None = None,
                 vv: VV = EMPTY) -> None:
        """Records up to ``seq`` of ``writer`` are already known (a snapshot)."""
        self.pos[writer] = Position(seq, block, vv)

    def accept_head(self, raw: bytes, public_key: bytes) -> LogHead:
        """Decode and verify a head against the last one accepted."""
        head = decode_head(raw)
        head.verify(public_key, self.volume)
        w = head.writer
        prev = self.heads.get(w)
        if prev is not None:
            if head.n < prev.n or head.seq < prev.seq or not prev.vv <= head.vv:
                raise LogRolledBack(
                    f"head n={head.n} seq={head.seq} is older than accepted n={prev.n} "
                    f"seq={prev.seq}", w)
            if (head.n == prev.n and head != prev) or (
                    head.seq == prev.seq and head.block != prev.block):
                raise LogForked("two different heads for the same point of the log", w)
        p = self.pos.get(w)
        if p is not None and head.seq < p.seq:
            raise LogRolledBack(f"head seq {head.seq} is behind records already read "
                                f"(seq {p.seq})", w)
        self.heads[w] = head
        return head

    def block_of(self, writer: bytes, seq: int) -> bytes | None:
        """The BGUID of the block holding record ``seq``, if this reader read it."""
        for first, last, g in self.block_index.get(writer, ()):
            if first <= seq <= last:
                return g
        p = self.pos.get(writer)
        if p is not None and p.seq == seq:
            return p.block
        return None

    async def read_new(self, head: LogHead) -> list[Record]:
        """Records of ``head``'s log after the reader's position, oldest first."""
        w = head.writer
        p = self.pos.setdefault(w, Position())
        if head.seq < p.seq:
            raise LogRolledBack(f"head seq {head.seq} is behind seq {p.seq} already read", w)
        if head.seq == p.seq:
            if p.block is not None and head.block != p.block:
                raise LogForked("head names another block for a record already read", w)
            return []
        out: list[Record] = []
        g, expect_last = head.block, head.seq
        index: list[tuple[int, int, bytes]] = []
        while True:
            blk = await self._get_block(g, w)
            if blk.last != expect_last:
                raise LogCorrupt(f"block ends at seq {blk.last}, expected {expect_last}", w)
            index.append((blk.first, blk.last, g))
            if blk.first <= p.seq + 1:
                if p.seq >= blk.first and p.block is not None and g != p.block:
                    raise LogForked("log no longer passes through the block already read", w)
                if p.seq == blk.first - 1 and p.seq > 0 and p.block is not None \
                        and blk.prev != p.block:
                    raise LogForked("log no longer continues from the block already read", w)
                out.extend(r for r in reversed(blk.records) if r.seq > p.seq)
                break
            out.extend(reversed(blk.records))
            g, expect_last = blk.prev, blk.first - 1
        out.reverse()
        prev_vv = p.vv
        for r in out:
            if r.seq == 1 and (r.op != Op.END or r.body.volume != self.volume):
                raise LogCorrupt("a log starts with an End record for its volume", w)
            if not prev_vv <= r.vv:
                raise LogCorrupt(f"record {r.seq}'s vector goes backwards", w)
            prev_vv = r.vv
        if not out[-1].vv <= head.vv:
            raise BadLogHead("head's vector is behind its newest record", w)
        self.records_fetched += len(out)
        self.pos[w] = Position(head.seq, head.block, out[-1].vv)
        self.block_index.setdefault(w, []).extend(index)
        return out

    async def _get_block(self, g: bytes, w: bytes) -> LogBlock:
        raw = await self.blocks.get(g, Kind.RECORD)
        self.blocks_fetched += 1
        try:
            blk = decode_block(raw)
        except RecordError as e:
            raise LogCorrupt(f"log block {g[:4].hex()}: {e}", w) from None
        if blk.volume != self.volume or blk.writer != w:
            raise LogCorrupt("log block of another volume or writer", w)
        return blk

    def forget_blocks_before(self, writer: bytes, seq: int) -> None:
        """Drop index entries of blocks wholly before ``seq`` (the one
        holding ``seq`` is kept: a snapshot covering it names it)."""
        lst = self.block_index.get(writer)
        if lst:
            self.block_index[writer] = [e for e in lst if e[1] >= seq]
