"""Applying one log record to an :class:`~storage.fsstate.FsState`, with
POSIX semantics and deterministic conflict rules (Ivy, OSDI 2002, sections
4.1-4.3; DESIGN.md "storage/logs", Consistency).

Records arrive here one by one in the total order of ``storage.vv``. A record
was valid in its writer's view; in the merged view a concurrent record (one
its writer had not seen) may have changed things first. The rules, applied
identically by every reader:

* **Names.** An entry created (link, rename) where a concurrent record
  already made one: the earlier entry keeps the name, the later goes to
  ``stem.conflict-<writer>-<UTC time>-<seq>.ext`` (``FsState.free_name``).
* **File data.** A write or truncate that did not see the file's last data
  change starts or extends a conflict copy: a new file
  (``fsstate.conflict_ino``) holding the file as the writer saw it (its
  concurrent changes reverted from the undo notes) plus its change, linked
  next to the file under such a conflict name. Later changes that
  saw that copy's last change but not the file's go to the copy. The
  side that changed the file first in the total order keeps the name; a
  change that saw both resolves the conflict and the copy stays as a file.
* **Delete against change.** Removing the last entry of a file whose last
  change the remover had not seen keeps the file, renamed to a conflict name;
  a change to a file whose removal the writer had not seen brings it back
  (``resurrect``); rmdir of a directory that gained entries concurrently is
  not applied.
* **Moves.** Operations locate their entry by the inode it names; an entry
  moved or removed by a concurrent record is left as that record made it (the
  later operation is skipped), and a rename that would put a directory inside
  itself is skipped. Every diverted or skipped record is listed in
  ``FsState.conflicts``.
* Attributes and extended attributes: the later record in the total order wins.

A record that makes no sense even so (an unknown inode, a type mismatch: only
a faulty writer writes those) is skipped with a note; applying never raises.
Derived values are recomputed here as in Ivy: size from writes and
truncates, mtime and ctime from record times.
"""

from __future__ import annotations

from .extents import Blk, Extent, Extents, Undo, revert
from .fsstate import INO_LOW, INO_SHIFT, ROOT_INO, Conflict, FsState, Inode, Tomb, conflict_ino
from .records import (MAX_FILE_SIZE, Cancel, End, FileType, Link, MkInode, Prepare, Record,
                      Rename, SetAttr, SetXattr, SnapshotMark, Unlink, Write)


class _Skip(Exception):
    """This record has no effect on this state (reason in the message)."""


def apply(st: FsState, rec: Record) -> None:
    """Apply ``rec``, which must sort after every record applied so far."""
    if st.last_key is not None and rec.key <= st.last_key:
        raise ValueError("records must be applied in the total order")
    st.last_key = rec.key
    st.applied += 1
    try:
        _HANDLERS[type(rec.body)](st, rec, rec.body)
    except _Skip as e:
        st.note(rec, str(e))


# --------------------------------------------------------------------------
# Locating inodes


def _target(st: FsState, rec: Record, ino: int) -> Inode:
    """The inode a record changes: live; or removed by a record this one did
    not see (then it comes back); or removed by one it saw (a file the
    writer still had open: changed, but stays unreachable)."""
    n = st.inodes.get(ino)
    if n is not None:
        st.dirty.add(ino)
        return n
    t = st.tombs.get(ino)
    if t is None:
        raise _Skip(f"no inode {ino}")
    if not rec.sees(t.death):
        return _resurrect(st, rec, ino)
    return t.inode


def _dir(st: FsState, rec: Record, ino: int) -> Inode:
    """A directory a record adds an entry to (brought back if its removal
    was concurrent)."""
    n = st.inodes.get(ino)
    if n is None:
        t = st.tombs.get(ino)
        if t is None or rec.sees(t.death):
            raise _Skip(f"directory {ino} does not exist")
        n = _resurrect(st, rec, ino)
    if not n.is_dir:
        raise _Skip(f"{ino} is not a directory")
    st.dirty.add(ino)
    return n


def _resurrect(st: FsState, rec: Record, ino: int, depth: int = 0) -> Inode:
    t: Tomb = st.tombs.pop(ino)
    node = t.inode
    pdir, name = t.last
    parent = st.inodes.get(pdir)
    if parent is None and pdir in st.tombs and depth < 64:
        parent = _resurrect(st, rec, pdir, depth + 1)
    if parent is None or not parent.is_dir:
        parent = st.inodes[ROOT_INO]
    st.inodes[ino] = node
    new = name if name not in parent.entries else st.free_name(parent, name, rec.dot, rec.time)
    st.add_entry(parent, new, node, rec.dot, rec.time, name)
    st.conflicts.append(Conflict("delete", parent.ino, name, new, ino, ino, rec.dot, t.death))
    return node


def _find_entry(st: FsState, rec: Record, d: Inode, name: bytes, node: Inode) -> bytes | None:
    """The name under which ``d`` holds ``node`` as the record's writer knew
    it: ``name`` itself, or the conflict name an entry for ``node`` got when
    its record asked for ``name``."""
    e = d.entries.get(name)
    if e is not None and e.ino == node.ino:
        return name
    for dino, other in sorted(node.links):
        if dino == d.ino and d.entries[other].asked == name:
            return other
    return None


# --------------------------------------------------------------------------
# Handlers


def _noop(st, rec, body):
    return None


def _mkinode(st: FsState, rec: Record, b: MkInode) -> None:
    if b.ino in st.inodes or b.ino in st.tombs or b.ino == ROOT_INO:
        raise _Skip(f"inode {b.ino} already exists")
    if st.ranges and st.ranges.get(rec.writer) != b.ino >> INO_SHIFT:
        # Only a faulty writer numbers inodes outside its own range; taking
        # them would let it pre-empt another writer's next inode.
        raise _Skip(f"inode {b.ino} is outside the writer's range")
    t = rec.time
    n = Inode(b.ino, b.ftype, b.mode, b.uid, b.gid, t, t, t, target=b.target, rdev=b.rdev)
    if b.ftype == FileType.REG:
        n.data = Extents()
    elif b.ftype == FileType.DIR:
        n.entries = {}
    st.inodes[b.ino] = n
    st.dirty.add(b.ino)
    hi, lo = b.ino >> INO_SHIFT, b.ino & INO_LOW
    if b.ino >> 63 == 0 and lo > st.hwm.get(hi, 0):
        st.hwm[hi] = lo


def _link(st: FsState, rec: Record, b: Link) -> None:
    _drop_prepare(st, rec, b.dir, b.name)
    d = _dir(st, rec, b.dir)
    node = st.inodes.get(b.ino)
    if node is None:
        t = st.tombs.get(b.ino)
        if t is None or rec.sees(t.death):
            raise _Skip(f"no inode {b.ino} to link")
        node = _resurrect(st, rec, b.ino)
    if node.is_dir and node.nlink > 0:
        raise _Skip("a directory has one name")
    if node.is_dir and st.is_ancestor(node.ino, d.ino):
        raise _Skip("linking a directory inside itself")
    name = b.name
    e = d.entries.get(name)
    if e is not None:
        if e.ino == node.ino:
            raise _Skip("already linked there")
        name = st.free_name(d, b.name, rec.dot, rec.time)
        st.conflicts.append(Conflict("name", d.ino, b.name, name, e.ino, node.ino, e.dot, rec.dot))
    st.add_entry(d, name, node, rec.dot, rec.time, b.name)


def _unlink(st: FsState, rec: Record, b: Unlink) -> None:
    d = st.inodes.get(b.dir)
    node = st.inodes.get(b.ino)
    if d is None or not d.is_dir or node is None:
        raise _Skip("entry already gone")
    name = _find_entry(st, rec, d, b.name, node)
    if name is None:
        st.conflicts.append(Conflict("skipped", d.ino, b.name, b"", node.ino, 0, None, rec.dot))
        raise _Skip("entry moved by a concurrent record")
    if node.is_dir:
        if node.entries:
            st.conflicts.append(Conflict("skipped", d.ino, name, b"", node.ino, 0, None, rec.dot))
            raise _Skip("directory gained entries concurrently")
    elif node.nlink == 1 and not rec.sees(node.dtip):
        # The file changed concurrently: keep that change reachable.
        new = st.free_name(d, name, rec.dot, rec.time)
        st.move_entry(d, name, d, new, rec.dot, rec.time, _asked(d, name))
        st.conflicts.append(Conflict("delete", d.ino, name, new, node.ino, node.ino,
                                     node.dtip, rec.dot))
        return
    st.remove_entry(d, name, rec)


def _rename(st: FsState, rec: Record, b: Rename) -> None:
    sd = st.inodes.get(b.sdir)
    node = st.inodes.get(b.ino)
    if sd is None or not sd.is_dir or node is None:
        raise _Skip("source gone")
    sname = _find_entry(st, rec, sd, b.sname, node)
    if sname is None:
        st.conflicts.append(Conflict("skipped", sd.ino, b.sname, b"", node.ino, 0, None, rec.dot))
        raise _Skip("source moved by a concurrent record")
    dd = _dir(st, rec, b.ddir)
    if node.is_dir and st.is_ancestor(node.ino, dd.ino):
        st.conflicts.append(Conflict("skipped", sd.ino, sname, b"", node.ino, 0, None, rec.dot))
        raise _Skip("would move a directory inside itself")
    if b.exchange:
        return _exchange(st, rec, b, sd, sname, node, dd)
    dname = b.dname
    de = dd.entries.get(dname)
    if de is not None and de.ino == node.ino:
        raise _Skip("source and destination are the same file")
    if de is not None:
        target = st.inodes[de.ino]
        if de.ino == b.dino and rec.sees(de.dot):
            if target.is_dir != node.is_dir:
                raise _Skip("rename between a directory and a non-directory")
            if target.is_dir and target.entries:
                dname = st.free_name(dd, b.dname, rec.dot, rec.time)
                st.conflicts.append(Conflict("name", dd.ino, b.dname, dname, de.ino, node.ino,
                                             de.dot, rec.dot))
            elif not target.is_dir and target.nlink == 1 and not rec.sees(target.dtip):
                keep = st.free_name(dd, b.dname, rec.dot, rec.time)
                st.move_entry(dd, b.dname, dd, keep, rec.dot, rec.time, _asked(dd, b.dname))
                st.conflicts.append(Conflict("delete", dd.ino, b.dname, keep, target.ino,
                                             target.ino, target.dtip, rec.dot))
            else:
                st.remove_entry(dd, b.dname, rec)
        else:
            dname = st.free_name(dd, b.dname, rec.dot, rec.time)
            st.conflicts.append(Conflict("name", dd.ino, b.dname, dname, de.ino, node.ino,
                                         de.dot, rec.dot))
    st.move_entry(sd, sname, dd, dname, rec.dot, rec.time, b.dname)


def _asked(d: Inode, name: bytes) -> bytes:
    """The name an entry's writers know it by (before any conflict name)."""
    return d.entries[name].asked or name


def _exchange(st, rec, b: Rename, sd: Inode, sname: bytes, node: Inode, dd: Inode) -> None:
    other = st.inodes.get(b.dino)
    dname = _find_entry(st, rec, dd, b.dname, other) if other is not None else None
    if dname is None:
        st.conflicts.append(Conflict("skipped", dd.ino, b.dname, b"", node.ino, 0, None, rec.dot))
        raise _Skip("exchange target moved or gone")
    if other.is_dir and st.is_ancestor(other.ino, sd.ino):
        raise _Skip("would move a directory inside itself")
    if sd is dd and sname == dname:
        return
    st.detach_entry(sd, sname, rec.time)
    st.detach_entry(dd, dname, rec.time)
    st.add_entry(sd, sname, other, rec.dot, rec.time)
    st.add_entry(dd, dname, node, rec.dot, rec.time)


def _setattr(st: FsState, rec: Record, b: SetAttr) -> None:
    n = _target(st, rec, b.ino)
    if b.size is not None:
        if n.ftype != FileType.REG:
            raise _Skip("size of a non-file")
        _data_change(st, rec, n, lambda f: _truncate(f, b.size, rec.time))
    if b.mode is not None:
        n.mode = b.mode
    if b.uid is not None:
        n.uid = b.uid
    if b.gid is not None:
        n.gid = b.gid
    if b.atime is not None:
        n.atime = b.atime
    if b.mtime is not None:
        n.mtime = b.mtime
    n.ctime = rec.time


def _setxattr(st: FsState, rec: Record, b: SetXattr) -> None:
    n = _target(st, rec, b.ino)
    if b.value is None:
        n.xattrs.pop(b.name, None)
    else:
        n.xattrs[b.name] = b.value
    n.ctime = rec.time


def _write(st: FsState, rec: Record, b: Write) -> None:
    n = _target(st, rec, b.ino)
    if n.ftype != FileType.REG:
        raise _Skip("write to a non-file")
    _data_change(st, rec, n, lambda f: _write_data(f, b, rec.time))


def _prepare(st: FsState, rec: Record, b: Prepare) -> None:
    st.prepares.setdefault((b.dir, b.name), {})[rec.writer] = (rec.seq, rec.time)


def _cancel(st: FsState, rec: Record, b: Cancel) -> None:
    _drop_prepare(st, rec, b.dir, b.name)


def _drop_prepare(st: FsState, rec: Record, d: int, name: bytes) -> None:
    p = st.prepares.get((d, name))
    if p is not None and p.pop(rec.writer, None) is not None and not p:
        del st.prepares[(d, name)]


# --------------------------------------------------------------------------
# File data and conflict copies


def _write_data(f: Inode, b: Write, t: int) -> Undo:
    end = b.off + b.length
    removed = f.data.punch(b.off, end)
    if b.data is not None:
        if b.data:
            f.data.insert([Extent(b.off, end, b.data, 0)])
    else:
        pos, pieces = b.off, []
        for g, length in b.blocks:
            pieces.append(Extent(pos, pos + length, Blk(g), 0))
            pos += length
        f.data.insert(pieces)
    old = f.size
    f.size = max(old, end)
    f.mtime = f.ctime = t
    return Undo(old, b.off, end, removed)


def _truncate(f: Inode, size: int, t: int) -> Undo:
    old = f.size
    if size == old:
        return Undo(old, 0, 0, [])
    removed = f.data.punch(size, MAX_FILE_SIZE) if size < old else []
    f.size = size
    f.mtime = f.ctime = t
    return Undo(old, size, MAX_FILE_SIZE, removed) if size < old else Undo(old, 0, 0, [])


def _data_change(st: FsState, rec: Record, n: Inode, change) -> Inode:
    """Apply a data change to the file, or to the conflict copy of the side
    the record's writer was on (module docstring). Returns the inode changed."""
    if rec.sees(n.dtip):
        n.copies = [c for c in n.copies if c in st.inodes and not rec.sees(st.inodes[c].dtip)]
        _record_change(st, rec, n, change(n))
        return n
    for c in n.copies:
        cn = st.inodes.get(c)
        if cn is not None and rec.sees(cn.dtip):
            st.dirty.add(c)
            _record_change(st, rec, cn, change(cn))
            return cn
    copy = _make_copy(st, rec, n)
    _record_change(st, rec, copy, change(copy))
    n.copies.append(copy.ino)
    st.histful.add(n.ino)
    return copy


def _record_change(st: FsState, rec: Record, n: Inode, undo: Undo) -> None:
    n.dtip = rec.dot
    n.hist.append((rec.dot, undo))
    st.histful.add(n.ino)


def _make_copy(st: FsState, rec: Record, n: Inode) -> Inode:
    """A new file holding ``n`` as ``rec``'s writer saw it, linked beside ``n``."""
    data, size = n.data.copy(), n.size
    for dot, undo in reversed(n.hist):
        if rec.sees(dot):
            break
        size = revert(data, undo)
    salt = 0
    ino = conflict_ino(rec.dot)
    while ino in st.inodes or ino in st.tombs:
        salt += 1
        ino = conflict_ino(rec.dot, salt)
    c = Inode(ino, FileType.REG, n.mode, n.uid, n.gid, rec.time, rec.time, rec.time,
              size=size, xattrs=dict(n.xattrs), data=data)
    st.inodes[ino] = c
    if n.links:
        dino, name = min(n.links)
    else:
        dino, name = ROOT_INO, b"orphan-%d" % n.ino
    d = st.inodes[dino]
    new = st.free_name(d, name, rec.dot, rec.time)
    st.add_entry(d, new, c, rec.dot, rec.time)
    st.conflicts.append(Conflict("data", dino, name, new, n.ino, ino, n.dtip, rec.dot))
    return c


_HANDLERS = {
    End: _noop, SnapshotMark: _noop, MkInode: _mkinode, Link: _link, Unlink: _unlink,
    Rename: _rename, SetAttr: _setattr, SetXattr: _setxattr, Write: _write,
    Prepare: _prepare, Cancel: _cancel,
}
