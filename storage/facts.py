"""Per-file facts, readable as extended attributes (DESIGN.md "p2pfs/":
"per-file facts (AGUID, version, replicas) are readable as extended
attributes"; Ivy, OSDI 2002, section 3: every change is a record of one
writer's log).

``facts(namespace, ino)`` describes an inode of the live volume and
``HistoricalView.facts(ino)`` one of a past version, as a dict of full
attribute names to ASCII values. Names, all read-only, not listed by
``listxattr`` (copying tools would carry them elsewhere):

* ``user.p2pfs.volume``: the volume's AGUID (hex); (volume, inode) names a
  file for good, as files are not objects of their own here.
* ``user.p2pfs.inode``: the inode number in the volume (``0x...``).
* ``user.p2pfs.writer``: the writer that created the inode (its id, hex):
  read from the number's writer range (``storage.fsstate``); for a conflict
  copy the writer of the record whose change became the copy; ``root`` for
  the root.
* ``user.p2pfs.version``: ``<writer id hex>:<seq>`` of the last record that
  names the inode (``history.touched``: creation, data, attributes, links;
  a directory is named by the entries added to or removed from it), and
  ``user.p2pfs.changed``: that record's time (UTC, ms). A change that went
  to a conflict copy counts for the file it named. Absent when unknown
  (the record is settled and no ``History`` was given).
* ``user.p2pfs.blocks``: regular files: the BGUIDs (hex) of the DATA blocks
  holding the file's bytes, in file order, one per line (the FUSE layer
  asks the block layer for their holders: the "replicas" fact), and
  ``user.p2pfs.inline``: how many of its bytes live inline in records.
* ``user.p2pfs.point`` and ``user.p2pfs.point-vv``: in a past version, its
  name and version vector (``<writer hex>:<seq>`` joined by commas).
"""

from __future__ import annotations

from .extents import Blk
from .fs_errors import NotFound
from .fsstate import CONFLICT_BIT, INO_SHIFT, ROOT_INO, FsState, Inode
from .history import History, Point, touched
from .timenames import time_text
from .records import FileType, Record
from .vv import VV

FACT_PREFIX = "user.p2pfs."


def is_fact(name: bytes | str) -> bool:
    """Whether an attribute name is a read-only fact (setting it is refused)."""
    if isinstance(name, bytes):
        return name.startswith(FACT_PREFIX.encode())
    return name.startswith(FACT_PREFIX)


def vv_text(vv: VV) -> str:
    return ",".join(f"{w.hex()}:{s}" for w, s in vv.sorted_items())


def creator(view, st: FsState, ino: int) -> str:
    """The id (hex) of the writer that created ``ino`` (module docstring)."""
    if ino == ROOT_INO:
        return "root"
    if ino & CONFLICT_BIT:
        for c in st.conflicts:
            if c.copy_ino == ino and c.kind == "data":
                return c.loser.writer.hex()
        return "conflict copy"
    idx = (ino >> INO_SHIFT) - 1
    if 0 <= idx < len(view.participants):
        return view.participants[idx].id.hex()
    return "unknown"


def describe(view, st: FsState, node: Inode, last: Record | None,
             point: Point | None = None) -> dict[str, bytes]:
    """The facts of ``node`` in state ``st`` (module docstring)."""
    out = {
        "volume": view.volume.hex(),
        "inode": "%#x" % node.ino,
        "writer": creator(view, st, node.ino),
    }
    if last is not None:
        out["version"] = f"{last.writer.hex()}:{last.seq}"
        out["changed"] = time_text(last.time)
    if node.ftype == FileType.REG and node.data is not None:
        blocks, inline = {}, 0
        for e in node.data:
            if isinstance(e.src, Blk):
                blocks.setdefault(e.src.bguid, None)
            else:
                inline += e.length
        out["blocks"] = "\n".join(g.hex() for g in blocks)
        out["inline"] = str(inline)
    if point is not None:
        out["point"] = point.name
        out["point-vv"] = vv_text(point.cover)
    return {FACT_PREFIX + k: v.encode() for k, v in out.items()}


def facts(namespace, ino: int, *, history: History | None = None) -> dict[str, bytes]:
    """Facts of live inode ``ino`` of a mounted ``Namespace``. The last
    record naming it is searched among the unsettled records in memory,
    then in ``history`` (refresh it first to see settled changes)."""
    st = namespace.replica.current
    node = st.inodes.get(ino)
    if node is None:
        t = st.tombs.get(ino)
        if t is None:
            raise NotFound(f"no inode {ino}")
        node = t.inode                 # unlinked but still open here
    last = next((r for r in reversed(namespace.replica.pending) if ino in touched(r)), None)
    if last is None and history is not None:
        last = history.last_touch(ino)
    return describe(namespace.view, st, node, last)
