"""Ivy log records and the log blocks that carry them (Ivy, OSDI 2002,
section 3 and Table 1; DESIGN.md "storage/logs").

A record is one file-system operation, minimal as in Ivy: it never carries
derived values (a file's size or mtime), which readers recompute on replay.
Record types: ``End`` (the oldest record of every log, binding it to its
volume), ``MkInode`` (a new file, directory or symlink, not yet linked),
``Write`` (inline bytes for small writes, or the BGUIDs of ``Kind.DATA``
blocks for large ones), ``Link``, ``Unlink`` (also rmdir), ``Rename``,
``SetAttr`` (mode, owner, size, times), ``SetXattr`` (an extended attribute
set or removed), ``Prepare``/``Cancel`` (Ivy's protocol for exclusive
create) and ``SnapshotMark`` (the writer stored a snapshot). Operations
that name an existing directory entry also name the inode they expect to
find there, so a reader can apply them sensibly to a state that a
concurrent writer changed.

Every record has its writer's id, a per-writer ``seq`` (1, 2, 3, ... with no
gaps), the writer's clock ``time`` (ns; mtimes are computed from it) and a
version vector whose own entry is ``seq`` (``storage.vv``).

Formats (version 1), canonical msgpack (fields in a fixed order, so equal
records encode to equal bytes):

* a standalone record (local caches, tools): ``{"v", "w", "s", "vv", "t",
  "o", <op fields>}``, ``vv`` listing every entry but the writer's own, in
  writer-id order;
* a log block (a ``Kind.RECORD`` block, a group commit of consecutive
  records): ``{"v", "vol", "w", "prev", "first", "recs"}`` where ``prev`` is
  the BGUID of the block before (None for the oldest), ``first`` the seq of
  the first record, and each of ``recs`` is ``{"t", "o", "vv", <op fields>}``
  whose ``vv`` lists only the entries that differ from the previous record
  of the same block (the first lists all). Blocks are linked newest-first.

Decoding is strict: any malformed input (not msgpack, unknown version or
record type, a missing or unknown field, a value of the wrong type or out of
range, a vector entry that goes backwards) raises :class:`RecordError` and
nothing else, so bytes from storage can never crash a reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

from overlay.wire import frames
from overlay.wire.frames import FrameError

from .blockapi import MAX_BLOCK
from .errors import StorageError
from .vv import MAX_SEQ, VV, Dot, order_key

VERSION = 1
READABLE_VERSIONS = frozenset({1})

MAX_NAME = 255               # bytes in one directory entry name (NAME_MAX)
MAX_TARGET = 4096            # bytes in a symlink target (PATH_MAX)
MAX_RDEV = 2**64 - 1           # a dev_t
MAX_INLINE = 16 * 1024       # bytes of inline data one Write may carry
MAX_WRITE_BLOCKS = 64        # DATA blocks one Write may name
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 16 * 1024
MAX_FILE_SIZE = 2**63 - 1
MAX_INO = 2**64 - 1
MAX_WRITERS = 4096           # entries in one version vector
MAX_RECORDS_PER_BLOCK = 4096
MAX_ID = 2**32 - 1           # uid and gid


class RecordError(StorageError):
    """Bytes that should be a log record or log block are not a valid one of
    a version this code reads. They came from storage (or a writer) and are
    refused; the reader treats the log holding them as broken."""


class FileType(IntEnum):
    """What an inode is. Values are stored in ``MkInode`` records."""

    REG = 1
    DIR = 2
    LNK = 3
    FIFO = 4
    CHR = 5        # character device (``rdev`` names it)
    BLK = 6        # block device (``rdev`` names it)
    SOCK = 7       # a socket's name (the kernel keeps the socket itself)


class Op(IntEnum):
    """Record type codes, stored as ``"o"``."""

    END = 0
    MKINODE = 1
    WRITE = 2
    LINK = 3
    UNLINK = 4
    RENAME = 5
    SETATTR = 6
    SETXATTR = 7
    PREPARE = 8
    CANCEL = 9
    SNAPSHOT = 10


# --------------------------------------------------------------------------
# Operation payloads. FIELDS lists (attribute, msgpack key, spec) in the
# canonical order; the generic codec below does the rest.

_INO = frames.Int(1, MAX_INO)
_NAME = frames.Bytes(max=MAX_NAME)
_TIME = frames.Int(-(2**63), 2**63 - 1)
_OPT_TIME = frames.Nullable(_TIME)
_VVLIST = frames.ListOf(frames.ListOf(frames.AnyValue(), max=2), max=MAX_WRITERS)


class Body:
    """Base of operation payloads."""

    OP: ClassVar[Op]
    FIELDS: ClassVar[tuple]

    def check(self) -> None:
        """Cross-field rules beyond the schema; raise RecordError."""


@dataclass(frozen=True, slots=True)
class End(Body):
    """The oldest record of a log: binds the log to its volume."""

    volume: bytes
    OP = Op.END
    FIELDS = (("volume", "vol", frames.GUID),)


@dataclass(frozen=True, slots=True)
class MkInode(Body):
    """A new inode (not yet linked anywhere). ``target`` only for symlinks,
    ``rdev`` (the device number) only for device nodes; it is left out of
    the encoding when 0, so records written before devices were stored
    encode as they did."""

    ino: int
    ftype: FileType
    mode: int
    uid: int
    gid: int
    target: bytes | None = None
    rdev: int = 0
    OP = Op.MKINODE
    FIELDS = (("ino", "i", _INO), ("ftype", "ft", frames.Int(1, max(FileType))),
              ("mode", "m", frames.Int(0, 0o7777)), ("uid", "u", frames.Int(0, MAX_ID)),
              ("gid", "g", frames.Int(0, MAX_ID)),
              ("target", "tg", frames.Nullable(frames.Bytes(max=MAX_TARGET))),
              ("rdev", "rd", frames.Optional(frames.Int(1, MAX_RDEV))))

    def check(self) -> None:
        if (self.ftype == FileType.LNK) != (self.target is not None):
            raise RecordError("a symlink inode needs a target, and only a symlink has one")
        if self.target is not None and not self.target:
            raise RecordError("empty symlink target")
        if self.rdev and self.ftype not in (FileType.CHR, FileType.BLK):
            raise RecordError("only a device node has a device number")
        if not 0 <= self.rdev <= MAX_RDEV:
            raise RecordError("device number out of range")


@dataclass(frozen=True, slots=True)
class Write(Body):
    """Bytes written at ``off``: inline ``data``, or ``blocks``, a list of
    (BGUID of a Kind.DATA block, bytes used from its start) laid end to end."""

    ino: int
    off: int
    data: bytes | None = None
    blocks: tuple[tuple[bytes, int], ...] | None = None
    OP = Op.WRITE
    FIELDS = (("ino", "i", _INO), ("off", "of", frames.Int(0, MAX_FILE_SIZE)),
              ("data", "d", frames.Nullable(frames.Bytes(max=MAX_INLINE))),
              ("blocks", "b", frames.Nullable(frames.ListOf(
                  frames.ListOf(frames.AnyValue(), max=2), max=MAX_WRITE_BLOCKS))))

    @property
    def length(self) -> int:
        if self.data is not None:
            return len(self.data)
        return sum(n for _, n in self.blocks)

    def check(self) -> None:
        if (self.data is None) == (self.blocks is None):
            raise RecordError("a write has exactly one of inline data and blocks")
        if self.blocks is not None:
            if not self.blocks:
                raise RecordError("a block write names at least one block")
            for b in self.blocks:
                if (len(b) != 2 or type(b[0]) is not bytes or len(b[0]) != 32
                        or type(b[1]) is not int or not 1 <= b[1] <= MAX_BLOCK):
                    raise RecordError("a write block is [32-byte BGUID, 1..MAX_BLOCK bytes]")
        if self.off + self.length > MAX_FILE_SIZE:
            raise RecordError("write past the largest file size")


@dataclass(frozen=True, slots=True)
class Link(Body):
    """Directory entry ``name`` in ``dir`` now names inode ``ino``."""

    dir: int
    name: bytes
    ino: int
    OP = Op.LINK
    FIELDS = (("dir", "p", _INO), ("name", "n", _NAME), ("ino", "i", _INO))

    def check(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True, slots=True)
class Unlink(Body):
    """Remove entry ``name`` of ``dir``, which the writer saw naming ``ino``
    (unlink and rmdir alike)."""

    dir: int
    name: bytes
    ino: int
    OP = Op.UNLINK
    FIELDS = (("dir", "p", _INO), ("name", "n", _NAME), ("ino", "i", _INO))

    def check(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True, slots=True)
class Rename(Body):
    """Move entry (``sdir``, ``sname``) naming ``ino`` to (``ddir``,
    ``dname``). ``dino`` is the inode the writer saw at the destination
    (replaced, or swapped with when ``exchange``), None if it was free."""

    sdir: int
    sname: bytes
    ino: int
    ddir: int
    dname: bytes
    dino: int | None = None
    exchange: bool = False
    OP = Op.RENAME
    FIELDS = (("sdir", "sp", _INO), ("sname", "sn", _NAME), ("ino", "i", _INO),
              ("ddir", "dp", _INO), ("dname", "dn", _NAME),
              ("dino", "di", frames.Nullable(_INO)), ("exchange", "x", bool))

    def check(self) -> None:
        _check_name(self.sname)
        _check_name(self.dname)
        if self.exchange and self.dino is None:
            raise RecordError("an exchanging rename names the destination inode")


@dataclass(frozen=True, slots=True)
class SetAttr(Body):
    """Change some attributes (None: unchanged). A size is a truncate or
    extension; times are explicit utimes() values in ns."""

    ino: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: int | None = None
    mtime: int | None = None
    OP = Op.SETATTR
    FIELDS = (("ino", "i", _INO), ("mode", "m", frames.Nullable(frames.Int(0, 0o7777))),
              ("uid", "u", frames.Nullable(frames.Int(0, MAX_ID))),
              ("gid", "g", frames.Nullable(frames.Int(0, MAX_ID))),
              ("size", "sz", frames.Nullable(frames.Int(0, MAX_FILE_SIZE))),
              ("atime", "at", _OPT_TIME), ("mtime", "mt", _OPT_TIME))


@dataclass(frozen=True, slots=True)
class SetXattr(Body):
    """Set extended attribute ``name`` of ``ino`` to ``value`` (None removes it)."""

    ino: int
    name: bytes
    value: bytes | None
    OP = Op.SETXATTR
    FIELDS = (("ino", "i", _INO), ("name", "n", frames.Bytes(max=MAX_XATTR_NAME)),
              ("value", "x", frames.Nullable(frames.Bytes(max=MAX_XATTR_VALUE))))

    def check(self) -> None:
        if not self.name:
            raise RecordError("empty extended attribute name")


@dataclass(frozen=True, slots=True)
class Prepare(Body):
    """Ivy's exclusive-create intent on (``dir``, ``name``)."""

    dir: int
    name: bytes
    OP = Op.PREPARE
    FIELDS = (("dir", "p", _INO), ("name", "n", _NAME))

    def check(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True, slots=True)
class Cancel(Body):
    """Withdraws this writer's Prepare on (``dir``, ``name``) after a clash."""

    dir: int
    name: bytes
    OP = Op.CANCEL
    FIELDS = (("dir", "p", _INO), ("name", "n", _NAME))

    def check(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True, slots=True)
class SnapshotMark(Body):
    """The writer stored a snapshot with root ``root`` covering ``cover``."""

    root: bytes
    cover: VV
    OP = Op.SNAPSHOT
    FIELDS = (("root", "r", frames.GUID), ("cover", "c", _VVLIST))


BODIES: dict[Op, type[Body]] = {
    c.OP: c for c in (End, MkInode, Write, Link, Unlink, Rename, SetAttr, SetXattr,
                      Prepare, Cancel, SnapshotMark)
}
_SCHEMAS = {op: frames.Struct({k: s for _, k, s in cls.FIELDS}) for op, cls in BODIES.items()}


def _check_name(name: bytes) -> None:
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise RecordError(f"bad directory entry name {name[:40]!r}")


@dataclass(frozen=True, slots=True)
class Record:
    """One log record: who, which, what they had seen, when, and the operation."""

    writer: bytes
    seq: int
    vv: VV
    time: int
    body: Body

    @property
    def op(self) -> Op:
        return self.body.OP

    @property
    def dot(self) -> Dot:
        return Dot(self.writer, self.seq)

    @property
    def key(self) -> tuple[int, bytes, int]:
        """Position in the one total order (``storage.vv.order_key``)."""
        return order_key(self.vv, self.writer, self.seq)

    def sees(self, dot: Dot | tuple[bytes, int] | None) -> bool:
        """Whether this record's author had seen record ``dot``; a None dot
        (state older than every record in play) is always seen."""
        return dot is None or self.vv.sees(dot)


def make_record(writer: bytes, seq: int, vv: VV, time: int, body: Body) -> Record:
    """A record after the same checks a decoder applies (a bug here is ours)."""
    rec = Record(writer, seq, vv.with_entry(writer, seq), time, body)
    try:
        _check_record(rec)
    except RecordError as e:
        raise ValueError(f"invalid record: {e}") from None
    return rec


# --------------------------------------------------------------------------
# Encoding


def _vv_list(vv: VV, skip: bytes | None = None) -> list:
    return [[w, s] for w, s in vv.sorted_items() if w != skip]


def _body_fields(body: Body) -> dict:
    out: dict[str, Any] = {}
    for attr, key, spec in body.FIELDS:
        v = getattr(body, attr)
        if isinstance(spec, frames.Optional) and not v:
            continue            # absent means the default (0 / None)
        if isinstance(v, VV):
            v = _vv_list(v)
        elif attr == "blocks" and v is not None:
            v = [[g, n] for g, n in v]
        elif isinstance(v, IntEnum):
            v = int(v)
        out[key] = v
    return out


def encode_record(rec: Record) -> bytes:
    """A standalone record, canonical msgpack."""
    d = {"v": VERSION, "w": rec.writer, "s": rec.seq, "vv": _vv_list(rec.vv, rec.writer),
         "t": rec.time, "o": int(rec.op)}
    d.update(_body_fields(rec.body))
    return msgpack.packb(d, use_bin_type=True)


@dataclass(frozen=True, slots=True)
class LogBlock:
    """A decoded ``Kind.RECORD`` block: consecutive records of one writer."""

    volume: bytes
    writer: bytes
    prev: bytes | None
    records: tuple[Record, ...]

    @property
    def first(self) -> int:
        return self.records[0].seq

    @property
    def last(self) -> int:
        return self.records[-1].seq


def _block_entry(rec: Record, prev_vv: VV) -> dict:
    delta = [[w, s] for w, s in rec.vv.sorted_items()
             if w != rec.writer and prev_vv[w] != s]
    d = {"t": rec.time, "o": int(rec.op), "vv": delta}
    d.update(_body_fields(rec.body))
    return d


BLOCK_OVERHEAD = 192  # estimated envelope bytes of a block besides its records


def encode_block(volume: bytes, writer: bytes, prev: bytes | None,
                 records: list[Record] | tuple[Record, ...]) -> bytes:
    """A log block of consecutive records of ``writer`` (a bug in the caller
    raises ValueError, as does a block over ``MAX_BLOCK``)."""
    raw, n = encode_block_prefix(volume, writer, prev, records)
    if n != len(records):
        raise ValueError(f"log block of {len(records)} records exceeds {MAX_BLOCK} bytes")
    return raw


def encode_block_prefix(volume: bytes, writer: bytes, prev: bytes | None,
                        records: list[Record] | tuple[Record, ...]) -> tuple[bytes, int]:
    """The block of as many of ``records`` as fit in ``MAX_BLOCK``, and how
    many that is (group commit packs a queue with this)."""
    if not records:
        raise ValueError("a log block holds at least one record")
    packer = msgpack.Packer(use_bin_type=True)
    entries, pv, size = [], VV(), BLOCK_OVERHEAD
    for i, r in enumerate(records):
        if r.writer != writer or r.seq != records[0].seq + i:
            raise ValueError("a log block holds consecutive records of its writer")
        if not pv <= r.vv:
            raise ValueError("a writer's version vector never goes backwards")
        e = _block_entry(r, pv)
        size += len(packer.pack(e))
        if size > MAX_BLOCK:
            if i == 0:
                raise ValueError("one record does not fit in a log block")
            break
        entries.append(e)
        pv = r.vv
    d = {"v": VERSION, "vol": volume, "w": writer, "prev": prev,
         "first": records[0].seq, "recs": entries}
    raw = msgpack.packb(d, use_bin_type=True)
    # The estimate can miss by a few bytes (msgpack headers grow with counts
    # and sizes): shed records until the block fits, never exceed MAX_BLOCK.
    while len(raw) > MAX_BLOCK and len(entries) > 1:
        del entries[-1]
        raw = msgpack.packb(d, use_bin_type=True)
    if len(raw) > MAX_BLOCK:
        raise ValueError("one record does not fit in a log block")
    return raw, len(entries)


# --------------------------------------------------------------------------
# Strict decoding


def _unpack(raw: bytes) -> Any:
    if type(raw) is not bytes:
        raise RecordError("record bytes expected")
    if len(raw) > 4 * MAX_BLOCK:
        raise RecordError(f"{len(raw)} bytes is too large for a record or log block")
    try:
        return msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True,
                               ext_hook=_no_ext)
    except RecordError:
        raise
    except Exception as e:  # msgpack raises several unrelated types
        raise RecordError(f"not msgpack: {type(e).__name__}: {e}"[:200]) from None


def _no_ext(code, data):
    raise RecordError("msgpack extension types are not allowed")


def _check_version(d: Any, what: str) -> None:
    if type(d) is not dict:
        raise RecordError(f"a {what} is a map")
    v = d.get("v")
    if type(v) is not int or v not in READABLE_VERSIONS:
        raise RecordError(f"{what} format version {v!r} is not supported "
                          f"(this code reads {sorted(READABLE_VERSIONS)})")


def _decode_vv_entries(lst: Any, where: str) -> list[tuple[bytes, int]]:
    if type(lst) is not list or len(lst) > MAX_WRITERS:
        raise RecordError(f"{where}: a version vector is a list of [writer, seq]")
    out, last = [], None
    for e in lst:
        if (type(e) is not list or len(e) != 2 or type(e[0]) is not bytes or len(e[0]) != 32
                or type(e[1]) is not int or not 1 <= e[1] <= MAX_SEQ):
            raise RecordError(f"{where}: a vector entry is [32-byte writer id, seq >= 1]")
        if last is not None and e[0] <= last:
            raise RecordError(f"{where}: vector entries must be in strictly increasing writer order")
        last = e[0]
        out.append((e[0], e[1]))
    return out


def _decode_body(op_code: Any, fields: dict, where: str) -> Body:
    if type(op_code) is not int or op_code not in BODIES:
        raise RecordError(f"{where}: unknown record type {op_code!r}")
    op = Op(op_code)
    cls = BODIES[op]
    try:
        _SCHEMAS[op].check(fields, f"{where} {op.name}")
    except FrameError as e:
        raise RecordError(str(e)) from None
    kw = {}
    for attr, key, spec in cls.FIELDS:
        if isinstance(spec, frames.Optional):
            if key not in fields:
                continue        # the dataclass default
            if not fields[key]:
                raise RecordError(f"{where} {op.name}: {key!r} present with its default value")
        v = fields[key]
        if attr == "cover":
            v = VV(_decode_vv_entries(v, where))
        elif attr == "blocks" and v is not None:
            v = tuple(tuple(b) for b in v)
        elif attr == "ftype":
            v = FileType(v)
        kw[attr] = v
    body = cls(**kw)
    body.check()
    return body


def _check_record(rec: Record) -> None:
    if type(rec.writer) is not bytes or len(rec.writer) != 32:
        raise RecordError("a writer id is 32 bytes")
    if not 1 <= rec.seq <= MAX_SEQ:
        raise RecordError(f"seq {rec.seq} out of range")
    if rec.vv[rec.writer] != rec.seq:
        raise RecordError("a record's own vector entry must be its seq")
    if len(rec.vv) > MAX_WRITERS:
        raise RecordError("version vector too long")
    if type(rec.time) is not int or not -(2**63) <= rec.time < 2**63:
        raise RecordError("bad record time")
    if rec.op == Op.END and rec.seq != 1:
        raise RecordError("an End record is the first of its log")
    rec.body.check()


_COMMON = frozenset(("v", "w", "s", "vv", "t", "o"))


def decode_record(raw: bytes) -> Record:
    """A standalone record (``encode_record``), checked strictly."""
    d = _unpack(raw)
    _check_version(d, "record")
    missing = _COMMON.difference(d)
    if missing:
        raise RecordError(f"record lacks {sorted(missing)}")
    w, s, t = d["w"], d["s"], d["t"]
    if type(w) is not bytes or len(w) != 32:
        raise RecordError("a writer id is 32 bytes")
    if type(s) is not int or not 1 <= s <= MAX_SEQ:
        raise RecordError("bad seq")
    if type(t) is not int or not -(2**63) <= t < 2**63:
        raise RecordError("bad record time")
    entries = _decode_vv_entries(d["vv"], "record")
    if any(e[0] == w for e in entries):
        raise RecordError("a record's vector lists its own writer implicitly, not explicitly")
    fields = {k: x for k, x in d.items() if k not in _COMMON}
    body = _decode_body(d["o"], fields, "record")
    rec = Record(w, s, VV(entries).with_entry(w, s), t, body)
    _check_record(rec)
    return rec


_BLOCK_KEYS = frozenset(("v", "vol", "w", "prev", "first", "recs"))
_ENTRY_COMMON = frozenset(("t", "o", "vv"))


def decode_block(raw: bytes) -> LogBlock:
    """A log block (``encode_block``), every record checked strictly."""
    d = _unpack(raw)
    _check_version(d, "log block")
    if d.keys() != _BLOCK_KEYS:
        raise RecordError(f"a log block has exactly the keys {sorted(_BLOCK_KEYS)}")
    vol, w, prev, first, recs = d["vol"], d["w"], d["prev"], d["first"], d["recs"]
    if type(vol) is not bytes or len(vol) != 32 or type(w) is not bytes or len(w) != 32:
        raise RecordError("volume and writer ids are 32 bytes")
    if prev is not None and (type(prev) is not bytes or len(prev) != 32):
        raise RecordError("prev is a 32-byte BGUID or nil")
    if type(recs) is not list or not 1 <= len(recs) <= MAX_RECORDS_PER_BLOCK:
        raise RecordError("a log block holds 1..4096 records")
    if type(first) is not int or not 1 <= first <= MAX_SEQ - len(recs):
        raise RecordError("bad first seq")
    if (first == 1) != (prev is None):
        raise RecordError("exactly the block holding seq 1 has no prev")
    out, pv = [], VV()
    for i, e in enumerate(recs):
        where = f"record {first + i}"
        if type(e) is not dict or not _ENTRY_COMMON.issubset(e):
            raise RecordError(f"{where}: needs t, o, vv")
        t = e["t"]
        if type(t) is not int or not -(2**63) <= t < 2**63:
            raise RecordError(f"{where}: bad time")
        delta = _decode_vv_entries(e["vv"], where)
        upd = dict(pv)
        for ww, ss in delta:
            if ww == w:
                raise RecordError(f"{where}: own vector entry is implicit")
            if ss <= pv[ww]:
                raise RecordError(f"{where}: vector entry goes backwards")
            upd[ww] = ss
        seq = first + i
        body = _decode_body(e["o"], {k: x for k, x in e.items() if k not in _ENTRY_COMMON},
                            where)
        rec = Record(w, seq, VV(upd).with_entry(w, seq), t, body)
        _check_record(rec)
        out.append(rec)
        pv = rec.vv
    return LogBlock(vol, w, prev, tuple(out))
