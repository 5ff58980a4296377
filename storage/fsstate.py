"""The computed file system: what replaying Ivy log records yields (Ivy,
OSDI 2002, sections 3-4; DESIGN.md "storage/logs").

An :class:`FsState` is a pure function of the records applied to it, in the
one total order (``storage.vv``): an inode table (type, mode, owner, link
count, size, times, symlink target, extended attributes, file data as
:class:`~storage.extents.Extents`, directory entries) plus the list of
conflicts found so far. ``storage.fsapply`` applies records; this module
holds the tables and the primitive mutations they share.

Invariants (checked by ``check()`` in tests):

* every live inode but the root is reachable from the root through entries,
  except one just created whose Link record has not been applied yet;
  a file's ``links`` are exactly the entries naming it and ``nlink`` counts
  them; a directory has one entry naming it and ``parent`` is its directory;
* an inode whose last entry was removed moves to ``tombs`` with the dot of
  the record that removed it, so a record that did not see the removal
  (a concurrent write, say) can bring it back instead of losing data;
* per-record bookkeeping for conflicts (``dtip``, ``hist``, entry dots,
  tombstones) concerns only records some writer may not have seen; ``trim``
  drops whatever every writer has seen, and a snapshot holds none of it.

Inode numbers: the root is 1. Writer ``i`` (its index in the volume's view)
numbers its inodes ``(i + 1) << 40 | n`` for n = 1, 2, ...; conflict copies
get ``1 << 63 | hash(record dot)``. So numbers are unique without any
coordination, and every reader derives the same ones.
"""

from __future__ import annotations

import hashlib
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from .extents import Extents
from .records import MAX_NAME, FileType, Record
from .vv import VV, Dot

ROOT_INO = 1
INO_SHIFT = 40
INO_LOW = (1 << INO_SHIFT) - 1
MAX_WRITER_INDEX = (1 << (63 - INO_SHIFT)) - 2
CONFLICT_BIT = 1 << 63
DIR_SIZE = 4096

_IFMT = {FileType.REG: stat.S_IFREG, FileType.DIR: stat.S_IFDIR, FileType.LNK: stat.S_IFLNK,
         FileType.FIFO: stat.S_IFIFO, FileType.CHR: stat.S_IFCHR, FileType.BLK: stat.S_IFBLK,
         FileType.SOCK: stat.S_IFSOCK}
FTYPE_OF_IFMT = {v: k for k, v in _IFMT.items()}


def ino_for(writer_index: int, n: int) -> int:
    """The n-th inode number of the writer with this view index."""
    if not 0 <= writer_index <= MAX_WRITER_INDEX or not 1 <= n <= INO_LOW:
        raise ValueError("writer index or inode counter out of range")
    return ((writer_index + 1) << INO_SHIFT) | n


def conflict_ino(dot: Dot, salt: int = 0) -> int:
    """The inode number of the conflict copy made by record ``dot``."""
    h = hashlib.sha256(b"p2pfs conflict copy" + dot.writer + dot.seq.to_bytes(8, "big")
                       + salt.to_bytes(4, "big")).digest()
    return CONFLICT_BIT | (int.from_bytes(h[:8], "big") & (CONFLICT_BIT - 1)) | 2


class Entry(NamedTuple):
    """A directory entry: the inode it names, the record that made it (None
    once every writer has seen that record), and the name that record asked
    for when it had to take a conflict name instead (its writer still calls
    the entry by that name)."""

    ino: int
    dot: Dot | None
    asked: bytes | None = None


def split_extension(name: bytes) -> tuple[bytes, bytes]:
    """(stem, extension with its dot); no extension for dot-files, names
    ending in a dot, or "extensions" too long or with spaces to be one."""
    i = name.rfind(b".")
    if i <= 0 or i == len(name) - 1 or len(name) - i > 16 or b" " in name[i:]:
        return name, b""
    return name[:i], name[i:]


class Conflict(NamedTuple):
    """One conflict between concurrent records, as users list them.

    kind: ``name`` (two entries for one name: the later one got
    ``copy_name``), ``data`` (concurrent changes to a file: the loser's
    version is the file ``copy_ino`` at ``copy_name``), ``delete`` (a removal
    concurrent with a change: the file stayed, at ``copy_name``), ``skipped``
    (a rename, unlink or rmdir lost to a concurrent one and was not applied).
    ``winner`` is the record whose effect holds the name, ``loser`` the one
    that was diverted or skipped."""

    kind: str
    dir: int
    name: bytes
    copy_name: bytes
    ino: int
    copy_ino: int
    winner: Dot | None
    loser: Dot


@dataclass(slots=True)
class Inode:
    ino: int
    ftype: FileType
    mode: int                      # permission bits only
    uid: int
    gid: int
    atime: int
    mtime: int
    ctime: int
    nlink: int = 0                 # entries naming it
    size: int = 0
    target: bytes | None = None    # symlinks
    xattrs: dict = field(default_factory=dict)
    data: Extents | None = None    # regular files
    entries: dict | None = None    # directories: name -> Entry
    parent: int = 0                # directories: the directory naming it
    subdirs: int = 0               # directories: entries that are directories
    links: set = field(default_factory=set)   # {(dir ino, name)}
    # Conflict bookkeeping for records not yet seen by every writer:
    dtip: Dot | None = None        # last data change applied to this file
    hist: list = field(default_factory=list)  # [(Dot, Undo)], a dominance chain
    copies: list = field(default_factory=list)  # live conflict copies of this file
    rdev: int = 0                  # device nodes

    @property
    def is_dir(self) -> bool:
        return self.ftype == FileType.DIR

    def clone(self) -> "Inode":
        return Inode(
            self.ino, self.ftype, self.mode, self.uid, self.gid, self.atime, self.mtime,
            self.ctime, self.nlink, self.size, self.target, dict(self.xattrs),
            self.data.copy() if self.data is not None else None,
            dict(self.entries) if self.entries is not None else None,
            self.parent, self.subdirs, set(self.links), self.dtip, list(self.hist),
            list(self.copies), self.rdev)

    @property
    def st_mode(self) -> int:
        return _IFMT[self.ftype] | self.mode

    @property
    def st_nlink(self) -> int:
        return 2 + self.subdirs if self.is_dir else self.nlink

    @property
    def st_size(self) -> int:
        if self.is_dir:
            return DIR_SIZE
        if self.ftype == FileType.LNK:
            return len(self.target)
        return self.size


class Tomb(NamedTuple):
    """An inode whose last entry was removed, kept while some writer may
    not have seen the removal."""

    inode: Inode
    death: Dot
    last: tuple[int, bytes]        # the entry removed last


class FsState:
    """Inode table, tombstones, conflicts: the state a prefix of the total
    order of records computes. Mutate only through ``storage.fsapply``."""

    def __init__(self, *, root_time: int = 0):
        root = Inode(ROOT_INO, FileType.DIR, 0o755, 0, 0, root_time, root_time, root_time,
                     nlink=1, entries={}, parent=ROOT_INO)
        self.inodes: dict[int, Inode] = {ROOT_INO: root}
        self.tombs: dict[int, Tomb] = {}
        self.hwm: dict[int, int] = {}          # ino >> 40 -> highest counter used
        self.prepares: dict[tuple[int, bytes], dict[bytes, tuple[int, int]]] = {}
        self.conflicts: list[Conflict] = []
        self.histful: set[int] = set()         # inodes with hist or copies
        self.dirty: set[int] = set()           # inodes changed since clear_dirty()
        self.applied = 0                       # records applied
        self.last_key: tuple | None = None
        self.skipped: deque[str] = deque(maxlen=100)  # why records had no effect
        self.ranges: dict[bytes, int] = {}     # writer id -> its inode range (index + 1)

    def clone(self) -> "FsState":
        s = FsState.__new__(FsState)
        s.inodes = {i: n.clone() for i, n in self.inodes.items()}
        s.tombs = {i: Tomb(t.inode.clone(), t.death, t.last) for i, t in self.tombs.items()}
        s.hwm = dict(self.hwm)
        s.prepares = {k: dict(v) for k, v in self.prepares.items()}
        s.conflicts = list(self.conflicts)
        s.histful = set(self.histful)
        s.dirty = set(self.dirty)
        s.applied = self.applied
        s.last_key = self.last_key
        s.skipped = deque(self.skipped, maxlen=100)
        s.ranges = self.ranges
        return s

    # ------------------------------------------------------------------
    # Queries

    def get(self, ino: int) -> Inode | None:
        """A live inode (reachable, or being created), or None."""
        return self.inodes.get(ino)

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        d = self.inodes.get(dir_ino)
        if d is None or d.entries is None:
            return None
        e = d.entries.get(name)
        return None if e is None else e.ino

    def next_counter(self, writer_index: int) -> int:
        """The next unused inode counter of a writer."""
        return self.hwm.get(writer_index + 1, 0) + 1

    def path_of(self, ino: int) -> bytes | None:
        """Some path of a live inode (the least link at each step), for messages."""
        parts = []
        seen = 0
        while ino != ROOT_INO:
            n = self.inodes.get(ino)
            if n is None or not n.links or seen > len(self.inodes):
                return None
            d, name = min(n.links)
            parts.append(name)
            ino = d
            seen += 1
        return b"/" + b"/".join(reversed(parts))

    # ------------------------------------------------------------------
    # Primitive mutations (used by fsapply)

    def mut(self, ino: int) -> Inode:
        """A live inode about to change: marks it dirty for snapshots."""
        self.dirty.add(ino)
        return self.inodes[ino]

    def add_entry(self, d: Inode, name: bytes, node: Inode, dot: Dot | None, t: int,
                  asked: bytes | None = None) -> None:
        self.dirty.update((d.ino, node.ino))
        d.entries[name] = Entry(node.ino, dot, asked if asked != name else None)
        node.links.add((d.ino, name))
        node.nlink += 1
        if node.is_dir:
            node.parent = d.ino
            d.subdirs += 1
        d.mtime = d.ctime = t
        node.ctime = t

    def detach_entry(self, d: Inode, name: bytes, t: int) -> Inode:
        """Remove an entry without deciding the inode's fate."""
        e = d.entries.pop(name)
        node = self.inodes[e.ino]
        self.dirty.update((d.ino, node.ino))
        node.links.discard((d.ino, name))
        node.nlink -= 1
        if node.is_dir:
            node.parent = 0
            d.subdirs -= 1
        d.mtime = d.ctime = t
        node.ctime = t
        return node

    def remove_entry(self, d: Inode, name: bytes, rec: Record) -> None:
        """Remove an entry; an inode left without entries becomes a tomb."""
        node = self.detach_entry(d, name, rec.time)
        if node.nlink == 0:
            del self.inodes[node.ino]
            self.tombs[node.ino] = Tomb(node, rec.dot, (d.ino, name))

    def move_entry(self, sd: Inode, sname: bytes, dd: Inode, dname: bytes,
                   dot: Dot | None, t: int, asked: bytes | None = None) -> None:
        node = self.detach_entry(sd, sname, t)
        self.add_entry(dd, dname, node, dot, t, asked)

    def free_name(self, d: Inode, name: bytes, dot: Dot, t: int) -> bytes:
        """A conflict name for ``name`` in ``d``, unused, from the record
        that needs it (``dot``, written at ``t`` ns): which writer, when, and
        the file's extension kept, so it still opens with the same program:
        ``report.conflict-3f2a91c0-20261125T231005Z-5.txt`` (writer's id
        prefix, the record's UTC time, its seq). Every reader derives the
        same name from the same record."""
        stem, ext = split_extension(name)
        when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t // 1_000_000_000))
        tag = b".conflict-%s-%s-%d" % (dot.writer[:4].hex().encode(), when.encode(), dot.seq)
        base = stem[:MAX_NAME - len(tag) - len(ext) - 4] + tag
        cand, i = base + ext, 1
        while cand in d.entries:
            i += 1
            cand = base + b"~" + str(i).encode() + ext
        return cand

    def note(self, rec: Record, why: str) -> None:
        self.skipped.append(f"{rec.writer[:4].hex()}:{rec.seq} {rec.op.name}: {why}")

    def is_ancestor(self, a: int, ino: int) -> bool:
        """Whether directory ``a`` is ``ino`` or one of its ancestors."""
        steps = 0
        while True:
            if ino == a:
                return True
            if ino == ROOT_INO or ino == 0 or steps > len(self.inodes):
                return False
            n = self.inodes.get(ino)
            if n is None:
                return False
            ino = n.parent
            steps += 1

    # ------------------------------------------------------------------
    # Forgetting what every writer has seen

    def trim(self, meet: VV, pinned: frozenset[int] | set[int] = frozenset()) -> None:
        """Drop conflict bookkeeping about records every writer has seen
        (``meet`` is what all writers have promised to have seen). The
        visible state is unchanged: no record any honest writer can still
        write can be concurrent with what is dropped."""
        for ino in list(self.histful):
            n = self.inodes.get(ino)
            if n is None:
                t = self.tombs.get(ino)
                n = t.inode if t else None
            if n is None:
                self.histful.discard(ino)
                continue
            k = 0
            while k < len(n.hist) and meet.sees(n.hist[k][0]):
                k += 1
            if k:
                del n.hist[:k]
            if n.dtip is not None and meet.sees(n.dtip):
                n.dtip = None
            # The copies list stays: a later record that has not seen a
            # newer change of the file must still find its side's copy.
            # Records that see the file's last change prune it.
            if not n.hist and not n.copies and n.dtip is None:
                self.histful.discard(ino)
        for ino in [i for i, t in self.tombs.items() if meet.sees(t.death) and i not in pinned]:
            del self.tombs[ino]

    def clear_dirty(self) -> None:
        self.dirty.clear()

    # ------------------------------------------------------------------
    # Checks and canonical views (tests, fsck)

    def check(self) -> None:
        """Raise AssertionError if an invariant of the module docstring fails."""
        seen = {ROOT_INO}
        stack = [ROOT_INO]
        links: dict[int, set] = {}
        while stack:
            d = self.inodes[stack.pop()]
            assert d.is_dir, d.ino
            subdirs = 0
            for name, e in d.entries.items():
                assert e.ino in self.inodes, (d.ino, name, e.ino)
                links.setdefault(e.ino, set()).add((d.ino, name))
                child = self.inodes[e.ino]
                if child.is_dir:
                    subdirs += 1
                    assert child.parent == d.ino, (child.ino, child.parent, d.ino)
                    assert e.ino not in seen, f"directory {e.ino} named twice"
                if e.ino not in seen:
                    seen.add(e.ino)
                    if child.is_dir:
                        stack.append(e.ino)
            assert subdirs == d.subdirs, (d.ino, subdirs, d.subdirs)
        for ino, n in self.inodes.items():
            if ino == ROOT_INO:
                continue
            assert n.links == links.get(ino, set()), (ino, n.links, links.get(ino))
            assert n.nlink == len(n.links), (ino, n.nlink, n.links)
            assert ino in seen or n.nlink == 0, f"inode {ino} unreachable"
        assert not set(self.tombs) & set(self.inodes)

    def canonical(self) -> tuple:
        """Everything a reader can observe, in a canonical form: two states
        are equivalent exactly when these are equal."""
        out = []
        for ino in sorted(self.inodes):
            n = self.inodes[ino]
            out.append((ino, int(n.ftype), n.mode, n.uid, n.gid, n.st_nlink, n.st_size,
                        n.atime, n.mtime, n.ctime, n.target, n.rdev, tuple(sorted(n.xattrs.items())),
                        tuple(n.data) if n.data is not None else None,
                        tuple(sorted((k, e.ino) for k, e in n.entries.items()))
                        if n.entries is not None else None))
        return (tuple(out), tuple(sorted(self.hwm.items())), tuple(self.conflicts))
