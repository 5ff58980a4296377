"""Time travel and file facts for the FUSE layer (DESIGN.md "p2pfs/": "past
versions are browsable read-only; per-file facts (AGUID, version, replicas)
are readable as extended attributes"; Ivy, OSDI 2002, section 4: any prefix
of the merged logs is a file system).

The semantics live in the log layer (``storage.timetravel``,
``storage.facts``); this module adapts them for ``p2pfs.fs``:

* ``.snapshots`` in the mount root is **hidden from the root's listing but
  reachable by name** (ZFS's ``snapdir=hidden``): ``cp -r``, ``du``, ``find``
  and backups of the mount do not walk every past version, while
  ``ls /mnt/.snapshots`` and ``cd /mnt/.snapshots/latest`` work. The name is
  reserved in the root: an entry of that name made by another client is
  neither listed nor reachable here, creating it answers EEXIST, and
  removing or renaming it EROFS. Everything below it is read-only (EROFS).
* Kernel caching of history: a version's files never change, so their
  entries and attributes are cached for ``HISTORY_TTL`` and their page cache
  kept across opens (the same file in two versions has two inode numbers).
  ``.snapshots`` itself and the names in it (versions appear, ``latest``
  moves) are cached for ``TOP_TTL`` only, and names missing there are not
  cached at all.
* Facts of live files, all read-only and never listed (so ``cp -a`` and
  ``rsync -X`` do not copy them): those of ``storage.facts`` plus
  ``user.p2pfs.replicas`` (copies kept of each block), ``user.p2pfs.backend``
  (where the volume lives), ``user.p2pfs.holders`` (one line per data
  block, ``<bguid>: <node id>,...``, the nodes the overlay finds holding
  it; ``-`` while none is found, as holders publish their pointers in the
  background shortly after a write; the first ``HOLDERS_MAX_BLOCKS`` blocks;
  needs a network volume, else ENODATA) and
  ``user.p2pfs.facts`` (every fact but the holders, as one JSON object, for
  ``getfattr -n user.p2pfs.facts``, since ``getfattr -d`` lists only listed
  names). Past files have the facts of ``HistoricalView.facts``.
* ``user.p2pfs.conflicts`` on the root: the volume's conflicts as a JSON
  list (:func:`conflict_json`), newest last; ``user.p2pfs.conflict-count``
  their number (the list keeps the newest that fit in ``XATTR_MAX`` bytes).
"""

from __future__ import annotations

import json
import logging
import time

import trio

from storage.facts import FACT_PREFIX, facts
from storage.fs_errors import Exists, NoData, NotFound, ReadOnly
from storage.fsstate import ROOT_INO, Conflict
from storage.namespace import Attr, Namespace
from storage.records import (Link, MkInode, Rename, Record, SetAttr, SetXattr, Unlink,
                             Write)
from storage.timenames import time_text
from storage.timetravel import DIR_NAME, SNAPSHOTS_INO, TimeTravel

log = logging.getLogger("p2pfs.fs")

TOP_TTL = 1.0                # seconds the kernel may cache .snapshots and the names in it
HISTORY_TTL = 300.0          # ... and anything inside a version (it never changes)
HOLDERS_TTL = 10.0           # seconds a holders answer is reused (getxattr comes twice)
HOLDERS_MAX_BLOCKS = 64      # blocks located per holders answer
HOLDERS_PARALLEL = 8         # blocks located at once
LOCATE_TIMEOUT = 15.0        # seconds all locating of one answer may take
XATTR_MAX = 65536            # the kernel's largest attribute value
MAX_DEPTH = 4096             # directory levels walked to name a path

P = FACT_PREFIX.encode()
REPLICAS, BACKEND, HOLDERS, ALL = P + b"replicas", P + b"backend", P + b"holders", P + b"facts"
CONFLICTS, CONFLICT_COUNT = P + b"conflicts", P + b"conflict-count"


def _text(name: bytes) -> str:
    """A file name for JSON: UTF-8, undecodable bytes as \\xNN."""
    return name.decode("utf-8", "backslashreplace")


def path_of(st, ino: int) -> str | None:
    """The live path of directory ``ino`` in state ``st`` (None if it is
    gone or not reachable from the root)."""
    parts: list[bytes] = []
    node = st.inodes.get(ino)
    for _ in range(MAX_DEPTH):
        if node is None or not node.is_dir:
            return None
        if node.ino == ROOT_INO:
            return "/" + "/".join(_text(p) for p in reversed(parts))
        parent = st.inodes.get(node.parent)
        if parent is None or not parent.entries:
            return None
        name = next((n for n, e in parent.entries.items() if e.ino == node.ino), None)
        if name is None:
            return None
        parts.append(name)
        node = parent
    return None


def _did(rec: Record | None) -> str | None:
    """What a record did, in a few words."""
    if rec is None:
        return None
    b = rec.body
    if isinstance(b, Write):
        return f"write at {b.off}"
    if isinstance(b, SetAttr):
        fields = [f for f in ("mode", "uid", "gid", "size", "atime", "mtime")
                  if getattr(b, f) is not None]
        return "setattr " + ",".join(fields)
    if isinstance(b, SetXattr):
        return ("setxattr " if b.value is not None else "removexattr ") + _text(b.name)
    if isinstance(b, Link):
        return "link " + _text(b.name)
    if isinstance(b, Unlink):
        return "unlink " + _text(b.name)
    if isinstance(b, Rename):
        return f"rename {_text(b.sname)} -> {_text(b.dname)}"
    if isinstance(b, MkInode):
        return "create " + b.ftype.name.lower()
    return type(b).__name__.lower()


def conflict_json(c: Conflict, st, record_of) -> dict:
    """One conflict for users (``fsstate.Conflict``): its kind, where (the
    directory's inode and live path, the name, the conflict copy's name and
    inode) and both sides: writer, seq, time and what each record did
    (``record_of(dot)`` -> Record or None)."""
    where = path_of(st, c.dir)

    def side(dot):
        if dot is None:
            return None
        rec = record_of(dot)
        return {"writer": dot.writer.hex(), "seq": dot.seq, "did": _did(rec),
                "time": time_text(rec.time) if rec is not None else None}

    def joined(name: bytes):
        if where is None or not name:
            return None
        return where.rstrip("/") + "/" + _text(name)

    return {"kind": c.kind, "dir": "%#x" % c.dir, "name": _text(c.name),
            "path": joined(c.name),
            "copy_name": _text(c.copy_name) if c.copy_name else None,
            "copy_path": joined(c.copy_name),
            "ino": "%#x" % c.ino, "copy_ino": "%#x" % c.copy_ino if c.copy_ino else None,
            "winner": side(c.winner), "loser": side(c.loser)}


def _overlay_locator(blocks, r: int):
    """``async (bguid) -> [node id]`` through the overlay when the volume's
    blocks are replicated on a network (``ReplicatedBlocks``), else None."""
    for _ in range(4):       # through caching wrappers
        node = getattr(blocks, "node", None)
        if node is not None and hasattr(node, "locate"):
            n = max(1, min(64, getattr(blocks, "r", r)))

            async def locate(bguid: bytes) -> list[bytes]:
                return [p.id for p in await node.locate(bguid, n)]
            return locate
        blocks = getattr(blocks, "inner", None)
        if blocks is None:
            break
    return None


class HistoryFront:
    """``.snapshots`` and the facts of one mount (module docstring).
    ``holders``: ``async (bguid) -> [node id]``, default: through the
    overlay when the volume's blocks are on a network."""

    def __init__(self, ns: Namespace, *, replicas: int = 1, description: str = "",
                 holders=None):
        self.ns = ns
        self.tt = TimeTravel(ns)
        self.replicas = replicas
        self.description = description
        self.holders = holders if holders is not None else _overlay_locator(ns.blocks, replicas)
        self.forgets = 0                 # history numbers dropped so far (see readdir)
        self._top: set[int] = set()      # inodes named in .snapshots: short timeouts
        self._holders: dict[int, tuple[float, tuple, bytes]] = {}

    owns = staticmethod(TimeTravel.owns)

    @staticmethod
    def is_reserved(parent: int, name: bytes) -> bool:
        """Whether (parent, name) is ``.snapshots`` in the root."""
        return parent == ROOT_INO and name == DIR_NAME

    @staticmethod
    def refuse_in(parent: int, name: bytes, op: str, creates: bool = False) -> None:
        """Changing a history directory is EROFS; making ``.snapshots`` in
        the root EEXIST (it is there), removing or replacing it EROFS."""
        if TimeTravel.owns(parent):
            raise ReadOnly(f"{op}: .snapshots and past versions are read-only")
        if parent == ROOT_INO and name == DIR_NAME:
            if creates:
                raise Exists(f"{op}: {name!r} is the history directory")
            raise ReadOnly(f"{op}: {name!r} is the history directory, read-only")

    def ttl(self, ino: int) -> float:
        """Seconds the kernel may cache a history inode's entry and attributes."""
        return TOP_TTL if ino == SNAPSHOTS_INO or ino in self._top else HISTORY_TTL

    def forget(self, ino: int) -> None:
        """The kernel holds no reference to history inode ``ino`` any more."""
        if ino != SNAPSHOTS_INO:
            self.tt.forget(ino)
            self._top.discard(ino)
            self.forgets += 1

    # ------------------------------------------------------------------
    # The tree

    async def top(self) -> Attr:
        """``.snapshots`` itself, with the versions accepted so far."""
        await self.tt.refresh()
        return await self.tt.lookup(ROOT_INO, DIR_NAME)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if parent == SNAPSHOTS_INO:
            await self.tt.refresh()
        a = await self.tt.lookup(parent, name)
        if parent == SNAPSHOTS_INO and name not in (b".", b".."):
            self._top.add(a.ino)
        return a

    async def getattr(self, ino: int) -> Attr:
        return await self.tt.getattr(ino)

    async def listing(self, ino: int) -> list[tuple[bytes, Attr, bool]]:
        """'.', '..' and the entries of a history directory, as
        ``(name, attributes, counted as a lookup)``."""
        if ino == SNAPSHOTS_INO:
            await self.tt.refresh()
        here = await self.tt.getattr(ino)
        up = await self.tt.lookup(ino, b"..")
        entries = await self.tt.readdir(ino)
        if ino == SNAPSHOTS_INO:
            self._top.update(a.ino for _, a in entries)
        return [(b".", here, False), (b"..", up, False)] + [(n, a, True) for n, a in entries]

    async def readlink(self, ino: int) -> bytes:
        return await self.tt.readlink(ino)

    async def open(self, ino: int, writing: bool) -> Attr:
        return await self.tt.open(ino, write=writing)

    async def read(self, ino: int, off: int, size: int) -> bytes:
        return await self.tt.read(ino, off, size)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """A history inode's own attributes and facts (``HistoricalView``),
        and the mount's ``replicas``, ``backend`` and ``facts`` as for live
        files."""
        if name in (REPLICAS, BACKEND, ALL):
            if ino == SNAPSHOTS_INO:
                raise NoData(f"no attribute {name!r}")
            try:
                known = await self.tt.facts(ino)
            except NotFound:
                raise NoData(f"no attribute {name!r}") from None    # a version alias
            return self._extra(known, name)
        return await self.tt.getxattr(ino, name)

    def _extra(self, known: dict[str, bytes], name: bytes) -> bytes:
        if name == REPLICAS:
            return b"%d" % self.replicas
        if name == BACKEND:
            return self.description.encode()
        out = {k[len(FACT_PREFIX):]: v.decode("ascii", "replace") for k, v in known.items()}
        out["replicas"] = self.replicas
        out["backend"] = self.description
        return json.dumps(out, sort_keys=True).encode()

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self.tt.listxattr(ino)

    # ------------------------------------------------------------------
    # Facts of live inodes

    async def facts(self, ino: int) -> dict[str, bytes]:
        """``storage.facts`` of live inode ``ino``; the history is read only
        when the last change of it is no longer among the unsettled records."""
        out = facts(self.ns, ino)
        if FACT_PREFIX + "version" not in out:
            await self.tt.refresh()
            out = facts(self.ns, ino, history=self.tt.history)
        return out

    async def live_fact(self, ino: int, name: bytes) -> bytes:
        """The value of fact ``name`` of live inode ``ino`` (module docstring);
        NoData for a name that is no fact of it."""
        if name in (REPLICAS, BACKEND):
            return self._extra({}, name)
        if name in (CONFLICTS, CONFLICT_COUNT):
            if ino != ROOT_INO:
                raise NoData(f"{name!r}: only the root has the conflict list")
            return await self.conflicts(count_only=name == CONFLICT_COUNT)
        known = await self.facts(ino)
        if name == ALL:
            return self._extra(known, name)
        if name == HOLDERS:
            blocks = known.get(FACT_PREFIX + "blocks")
            if blocks is None:
                raise NoData(f"{name!r}: not a regular file")
            return await self._holders_of(ino, blocks)
        v = known.get(name.decode("ascii", "replace"))
        if v is None:
            raise NoData(f"no attribute {name!r}")
        return v

    async def _holders_of(self, ino: int, blocks: bytes) -> bytes:
        """One line per data block: ``<bguid hex>: <node id hex>,...``
        (``-`` when none was found in time), at most HOLDERS_MAX_BLOCKS."""
        if self.holders is None:
            raise NoData("user.p2pfs.holders: the volume is not on a network "
                         "(its blocks are in one local store)")
        gs = [bytes.fromhex(h) for h in blocks.decode().split()]
        key = tuple(gs)
        hit = self._holders.get(ino)
        now = time.monotonic()
        if hit is not None and hit[1] == key and now - hit[0] < HOLDERS_TTL:
            return hit[2]
        found: dict[bytes, list[bytes]] = {}
        limiter = trio.CapacityLimiter(HOLDERS_PARALLEL)

        async def one(g: bytes) -> None:
            async with limiter:
                try:
                    found[g] = await self.holders(g)
                except Exception as e:  # noqa: BLE001 - shown as "none found"
                    log.info("locating block %s: %s", g[:4].hex(), e)

        with trio.move_on_after(LOCATE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for g in gs[:HOLDERS_MAX_BLOCKS]:
                    nursery.start_soon(one, g)
        lines = [f"{g.hex()}: {','.join(i.hex() for i in found.get(g, ())) or '-'}"
                 for g in gs[:HOLDERS_MAX_BLOCKS]]
        if len(gs) > HOLDERS_MAX_BLOCKS:
            lines.append(f"... {len(gs) - HOLDERS_MAX_BLOCKS} more blocks")
        value = "\n".join(lines).encode()
        self._holders[ino] = (now, key, value)
        if len(self._holders) > 256:
            self._holders.pop(next(iter(self._holders)))
        return value

    async def conflicts(self, *, count_only: bool = False) -> bytes:
        """The root's conflict list (module docstring)."""
        found = self.ns.conflicts()
        if count_only:
            return b"%d" % len(found)
        if not found:
            return b"[]"
        await self.tt.refresh()         # the records of settled conflicts
        pending = {(r.writer, r.seq): r for r in self.ns.replica.pending}
        logs = self.tt.history.logs

        def record_of(dot) -> Record | None:
            r = pending.get((dot.writer, dot.seq))
            if r is None:
                recs = logs.get(dot.writer, ())
                if 0 < dot.seq <= len(recs):
                    r = recs[dot.seq - 1]
            return r

        st = self.ns.replica.current
        items = [json.dumps(conflict_json(c, st, record_of), sort_keys=True) for c in found]
        # Newest last; keep the newest that fit in one attribute value.
        total, keep = 2, 0
        for s in reversed(items):
            if total + len(s) + 2 > XATTR_MAX:
                break
            total += len(s) + 2
            keep += 1
        if keep < len(items):
            log.warning("conflict list: %d conflicts, only the newest %d fit in an "
                        "extended attribute", len(items), keep)
        return ("[" + ", ".join(items[len(items) - keep:]) + "]").encode()

