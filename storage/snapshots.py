"""Snapshots of the computed file system (Ivy, OSDI 2002, section 4.4;
DESIGN.md "storage/logs": "Reading starts from the newest snapshot and
replays only newer records, so mount time stays flat as logs grow").

A snapshot is the *settled* state of ``storage.replica`` (records every
writer has promised to have seen, hence sorting before every record still to
come), stored as ``Kind.SNAPSHOT`` blocks:

* **pages**: the inode table cut by inode number (``ino >> PAGE_SHIFT``), each
  page a sorted list of inodes: attributes, extended attributes, symlink
  target, directory entries, and the file's extents. Small inline file data
  stays in the page; larger inline data is packed into ``Kind.DATA`` blocks
  (and the settled state is switched over to them, so it is packed once).
  Block-backed extents are kept as they are: a snapshot never copies file
  data that already lives in blocks. Large entry or extent lists go out of
  line in chunked lists.
* **index**: the sorted list of (page id, page BGUID), chunked.
* **root**: version, volume, writer, time, the version vector the snapshot
  covers (``cover``), the order key of its last record, per-writer log
  positions (seq, block, vector of the covered record), inode counters,
  prepares, conflicts, the index BGUIDs and the previous snapshot's root.

Incremental, copy-on-write: a writer keeps the page references of its
previous snapshot and re-encodes only pages holding inodes changed since
(``FsState.dirty``); equal plaintext seals to the same BGUID (convergent
sealing), and blocks this writer already stored are not stored again. The
root's BGUID and ``cover`` are the value to publish (today in the writer's
log-head; later as a version of the volume's snapshot object in the ring).

A snapshot is read strictly: anything malformed or inconsistent raises
:class:`SnapshotError`, and the reader falls back to an older one or to
replaying the logs from their start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgpack

from .blockapi import MAX_BLOCK, BlockAccess, Kind
from .errors import StorageError
from .extents import Blk, Extent, Extents
from .fsstate import ROOT_INO, Conflict, Entry, FsState, Inode
from .records import MAX_FILE_SIZE, MAX_NAME, MAX_RDEV, FileType
from .vv import VV, Dot

VERSION = 1
PAGE_SHIFT = 6                 # 64 consecutive inode numbers per page
INLINE_KEEP = 2048             # inline bytes a file keeps in its page
OUT_OF_LINE = 512              # entries/extents kept in a page before going out of line
_CHUNK = MAX_BLOCK - 1024      # target plaintext bytes of a chunk block


class SnapshotError(StorageError):
    """A snapshot's blocks are malformed or inconsistent (an entry naming a
    missing inode, a directory named twice, a field of the wrong type), or of
    a version this code does not read. The snapshot is not used."""


@dataclass
class SnapshotInfo:
    """What a snapshot root says, without its pages."""

    root: bytes
    writer: bytes
    time: int
    cover: VV
    key: tuple | None
    positions: dict[bytes, tuple[int, bytes | None, VV]]
    prev: bytes | None
    index: list[bytes]
    hwm: dict[int, int]
    prepares: dict
    conflicts: list[Conflict]
    pages: dict[int, bytes] = field(default_factory=dict)   # filled by load_state


def _pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def _unpack(raw: bytes):
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:
        raise SnapshotError(f"snapshot block is not msgpack: {type(e).__name__}") from None


def _vv_list(vv: VV) -> list:
    return [[w, s] for w, s in vv.sorted_items()]


def _vv(x) -> VV:
    # Writer ids must already be bytes: bytes(n) of an int n would allocate n bytes.
    try:
        if any(type(w) is not bytes for w, _ in x):
            raise SnapshotError("bad version vector in snapshot")
        return VV({w: s for w, s in x})
    except Exception:
        raise SnapshotError("bad version vector in snapshot") from None


def _ref(x, *, nullable: bool = False) -> bytes | None:
    """A BGUID read from a snapshot block: 32 bytes (or None if allowed)."""
    if (x is None and nullable) or (type(x) is bytes and len(x) == 32):
        return x
    raise SnapshotError("bad block reference in snapshot")


def _b(x) -> bytes:
    """A byte string read from a snapshot block (``bytes(x)`` would accept an
    int n and allocate n zero bytes)."""
    if type(x) is not bytes:
        raise SnapshotError(f"expected bytes in snapshot, got {type(x).__name__}")
    return x


def _dot(x) -> Dot | None:
    return None if x is None else Dot(x[0], x[1])


# --------------------------------------------------------------------------
# Writing


class SnapshotWriter:
    """Writes snapshots of one participant, incrementally."""

    def __init__(self, blocks: BlockAccess, volume: bytes, writer: bytes):
        self.blocks = blocks
        self.volume = volume
        self.writer = writer
        self.page_refs: dict[int, bytes] = {}
        self.last_root: bytes | None = None
        self._stored: dict[bytes, bytes] = {}   # sha256(kind, plaintext) -> BGUID
        self.blocks_put = 0

    def adopt(self, info: SnapshotInfo) -> None:
        """Continue from a snapshot this client loaded (its pages are reused)."""
        self.page_refs = dict(info.pages)
        self.last_root = info.root

    async def _put(self, kind: Kind, plaintext: bytes) -> bytes:
        h = hashlib.sha256(bytes((kind,)) + plaintext).digest()
        g = self._stored.get(h)
        if g is None:
            g = await self.blocks.put(kind, plaintext)
            self._stored[h] = g
            self.blocks_put += 1
        return g

    async def _put_list(self, items: list) -> list[bytes]:
        """A list of msgpack values as chunk blocks of at most ~MAX_BLOCK."""
        out, chunk, size = [], [], 16
        for it in items:
            n = len(_pack(it))
            if chunk and size + n > _CHUNK:
                out.append(await self._put(Kind.SNAPSHOT, _pack({"v": VERSION, "l": chunk})))
                chunk, size = [], 16
            chunk.append(it)
            size += n
        if chunk or not out:
            out.append(await self._put(Kind.SNAPSHOT, _pack({"v": VERSION, "l": chunk})))
        return out

    async def write(self, state: FsState, cover: VV, key: tuple | None,
                    positions: dict[bytes, tuple[int, bytes | None, VV]], *,
                    time_ns: int) -> bytes:
        """Store ``state`` (settled, no conflict bookkeeping) covering
        ``cover``; returns the root BGUID. Packs the state's larger inline
        data into DATA blocks in place (same content)."""
        dirty_pages = {ino >> PAGE_SHIFT for ino in state.dirty}
        if not self.page_refs:
            dirty_pages = {ino >> PAGE_SHIFT for ino in state.inodes}
        by_page: dict[int, list[int]] = {p: [] for p in dirty_pages}
        for ino in state.inodes:
            p = ino >> PAGE_SHIFT
            if p in by_page:
                by_page[p].append(ino)
        for p in sorted(by_page):
            inos = sorted(by_page[p])
            if not inos:
                self.page_refs.pop(p, None)
                continue
            entries = [await self._inode_entry(state.inodes[i]) for i in inos]
            raw = _pack({"v": VERSION, "p": p, "n": entries})
            if len(raw) > MAX_BLOCK:
                # Too many large inodes for one page: their big parts are
                # already out of line, so split the page itself.
                refs = await self._put_list(entries)
                raw = _pack({"v": VERSION, "p": p, "r": refs})
            self.page_refs[p] = await self._put(Kind.SNAPSHOT, raw)
        index = await self._put_list([[p, g] for p, g in sorted(self.page_refs.items())])
        conflicts = await self._put_list([_conflict_out(c) for c in state.conflicts])
        root = {
            "v": VERSION, "vol": self.volume, "w": self.writer, "t": time_ns,
            "cover": _vv_list(cover), "key": list(key) if key is not None else None,
            "pos": [[w, s, b, _vv_list(v)] for w, (s, b, v) in sorted(positions.items())],
            "hwm": sorted([k, v] for k, v in state.hwm.items()),
            "prep": [[d, n, [[w, s, t] for w, (s, t) in sorted(ws.items())]]
                     for (d, n), ws in sorted(state.prepares.items())],
            "conf": conflicts, "idx": index, "prev": self.last_root,
        }
        raw = _pack(root)
        if len(raw) > MAX_BLOCK:
            raise SnapshotError("snapshot root too large (too many writers or prepares)")
        g = await self.blocks.put(Kind.SNAPSHOT, raw)
        self.last_root = g
        state.clear_dirty()
        return g

    async def _inode_entry(self, n: Inode) -> dict:
        e = {"i": n.ino, "ft": int(n.ftype), "m": n.mode, "u": n.uid, "g": n.gid,
             "sz": n.size, "at": n.atime, "mt": n.mtime, "ct": n.ctime, "tg": n.target,
             "x": sorted([k, v] for k, v in n.xattrs.items()), "p": n.parent}
        if n.rdev:
            e["rd"] = n.rdev
        if n.data is not None:
            await self._pack_inline(n)
            ext = [[x.off, x.end, 1, x.src.bguid, x.soff] if isinstance(x.src, Blk)
                   else [x.off, x.end, 0, x.src[x.soff:x.soff + x.length], 0] for x in n.data]
            e["d"] = ext if len(ext) <= OUT_OF_LINE else {"r": await self._put_list(ext)}
        if n.entries is not None:
            ents = sorted([k, v.ino] for k, v in n.entries.items())
            e["e"] = ents if len(ents) <= OUT_OF_LINE else {"r": await self._put_list(ents)}
        return e

    async def _pack_inline(self, n: Inode) -> None:
        """Move a file's inline bytes into DATA blocks if they are many."""
        inline = [x for x in n.data if not isinstance(x.src, Blk)]
        if sum(x.length for x in inline) <= INLINE_KEEP:
            return
        new, buf, placed = [], bytearray(), []
        for x in n.data:
            if isinstance(x.src, Blk):
                new.append(x)
                continue
            if len(buf) + x.length > MAX_BLOCK and buf:
                g = await self._put(Kind.DATA, bytes(buf))
                new.extend(Extent(o, e, Blk(g), s) for o, e, s in placed)
                buf, placed = bytearray(), []
            piece = x.src[x.soff:x.soff + x.length]
            placed.append((x.off, x.end, len(buf)))
            buf += piece
        if buf:
            g = await self._put(Kind.DATA, bytes(buf))
            new.extend(Extent(o, e, Blk(g), s) for o, e, s in placed)
        new.sort(key=lambda x: x.off)
        n.data = Extents(new)


def _conflict_out(c: Conflict) -> list:
    return [c.kind, c.dir, c.name, c.copy_name, c.ino, c.copy_ino,
            list(c.winner) if c.winner else None, list(c.loser)]


# --------------------------------------------------------------------------
# Reading


async def _get(blocks: BlockAccess, g: bytes) -> dict:
    d = _unpack(await blocks.get(g, Kind.SNAPSHOT))
    if type(d) is not dict or d.get("v") not in (VERSION,):
        raise SnapshotError(f"snapshot block of unknown format {d.get('v') if type(d) is dict else d!r}")
    return d


async def _get_list(blocks: BlockAccess, refs) -> list:
    if type(refs) is not list:
        raise SnapshotError("bad chunk list")
    refs = [_ref(g) for g in refs]
    raws = await blocks.get_many([(g, Kind.SNAPSHOT) for g in refs])
    out = []
    for raw in raws:
        d = _unpack(raw)
        if type(d) is not dict or d.get("v") != VERSION or type(d.get("l")) is not list:
            raise SnapshotError("bad chunk block")
        out.extend(d["l"])
    return out


async def load_info(blocks: BlockAccess, root: bytes, volume: bytes) -> SnapshotInfo:
    """Read and check a snapshot's root block."""
    d = await _get(blocks, root)
    try:
        if d["vol"] != volume:
            raise SnapshotError("snapshot of another volume")
        key = d["key"]
        if key is not None:
            key = (int(key[0]), _b(key[1]), int(key[2]))
        pos = {_ref(w): (int(s), _ref(b, nullable=True), _vv(v)) for w, s, b, v in d["pos"]}
        prepares = {(int(dd), _b(n)): {_b(w): (int(s), int(t)) for w, s, t in ws}
                    for dd, n, ws in d["prep"]}
        conflicts = [Conflict(k, di, n, cn, i, ci, _dot(wi), _dot(lo))
                     for k, di, n, cn, i, ci, wi, lo in await _get_list(blocks, d["conf"])]
        return SnapshotInfo(root, _b(d["w"]), int(d["t"]), _vv(d["cover"]), key, pos,
                            _ref(d["prev"], nullable=True), [_ref(g) for g in d["idx"]],
                            {int(k): int(v) for k, v in d["hwm"]},
                            prepares, conflicts)
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"malformed snapshot root: {type(e).__name__}: {e}") from None


async def load_state(blocks: BlockAccess, info: SnapshotInfo) -> FsState:
    """The FsState a snapshot holds (its pages fetched, checked, linked)."""
    index = await _get_list(blocks, info.index)
    try:
        info.pages = {int(p): _ref(g) for p, g in index}
    except Exception:
        raise SnapshotError("bad page index") from None
    pages = sorted(info.pages.items())
    raws = await blocks.get_many([(g, Kind.SNAPSHOT) for _, g in pages])
    st = FsState()
    st.inodes.clear()
    try:
        for (p, _), raw in zip(pages, raws):
            d = _unpack(raw)
            if type(d) is not dict or d.get("v") != VERSION or d.get("p") != p:
                raise SnapshotError(f"bad snapshot page {p}")
            entries = d["n"] if "n" in d else await _get_list(blocks, d["r"])
            for e in entries:
                n = await _inode_in(blocks, e)
                if n.ino >> PAGE_SHIFT != p or n.ino in st.inodes:
                    raise SnapshotError(f"inode {n.ino} misplaced or repeated")
                st.inodes[n.ino] = n
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"malformed snapshot page: {type(e).__name__}: {e}") from None
    _link_up(st)
    st.hwm = dict(info.hwm)
    st.prepares = {k: dict(v) for k, v in info.prepares.items()}
    st.conflicts = list(info.conflicts)
    st.last_key = info.key
    st.clear_dirty()
    return st


async def _inode_in(blocks: BlockAccess, e: dict) -> Inode:
    ft = FileType(e["ft"])
    n = Inode(int(e["i"]), ft, int(e["m"]) & 0o7777, int(e["u"]), int(e["g"]), int(e["at"]),
              int(e["mt"]), int(e["ct"]), size=int(e["sz"]), target=e["tg"],
              xattrs={_b(k): _b(v) for k, v in e["x"]}, parent=int(e["p"]))
    if not 0 <= n.size <= MAX_FILE_SIZE:
        raise SnapshotError("bad size")
    if (ft == FileType.LNK) != (type(n.target) is bytes):
        raise SnapshotError("symlink target mismatch")
    if "rd" in e:
        n.rdev = e["rd"]
        if (type(n.rdev) is not int or not 0 < n.rdev <= MAX_RDEV
                or ft not in (FileType.CHR, FileType.BLK)):
            raise SnapshotError("bad device number")
    if ft == FileType.REG:
        ext = e["d"] if type(e["d"]) is list else await _get_list(blocks, e["d"]["r"])
        out, last = [], 0
        for off, end, tag, src, soff in ext:
            if not (type(off) is int and type(end) is int and last <= off < end <= n.size
                    and type(src) is bytes and type(soff) is int and soff >= 0):
                raise SnapshotError("bad extent")
            if tag == 1 and len(src) == 32 and soff + end - off <= MAX_BLOCK:
                out.append(Extent(off, end, Blk(src), soff))
            elif tag == 0 and soff == 0 and len(src) == end - off:
                out.append(Extent(off, end, src, 0))
            else:
                raise SnapshotError("bad extent source")
            last = end
        n.data = Extents(out)
    elif ft == FileType.DIR:
        ents = e["e"] if type(e["e"]) is list else await _get_list(blocks, e["e"]["r"])
        n.entries = {}
        for name, ino in ents:
            if (type(name) is not bytes or not 0 < len(name) <= MAX_NAME or b"/" in name
                    or b"\0" in name or name in (b".", b"..") or type(ino) is not int
                    or name in n.entries):
                raise SnapshotError("bad directory entry")
            n.entries[name] = Entry(ino, None)
    return n


def _link_up(st: FsState) -> None:
    """Rebuild links, link counts and subdirectory counts from the entries,
    checking the tree (every entry names an inode; a directory has one name)."""
    if ROOT_INO not in st.inodes or not st.inodes[ROOT_INO].is_dir:
        raise SnapshotError("snapshot has no root directory")
    for n in st.inodes.values():
        n.links, n.nlink, n.subdirs = set(), 0, 0
    st.inodes[ROOT_INO].nlink = 1
    for d in st.inodes.values():
        if d.entries is None:
            continue
        for name, e in d.entries.items():
            child = st.inodes.get(e.ino)
            if child is None or e.ino == ROOT_INO:
                raise SnapshotError(f"entry {name!r} names a missing inode {e.ino}")
            child.links.add((d.ino, name))
            child.nlink += 1
            if child.is_dir:
                if child.nlink > 1 or child.parent != d.ino:
                    raise SnapshotError(f"directory {e.ino} is named twice or misparented")
                d.subdirs += 1
    try:
        st.check()
    except AssertionError as e:
        raise SnapshotError(f"snapshot tree is inconsistent: {e}") from None
