"""The computed file system (storage/fsstate.py, fsapply.py, replica.py):
POSIX effects of records, the conflict rules for concurrent records, and
determinism: every arrival order of the same records gives the same state."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from storage.extents import Blk, Extent, Extents, Undo, revert
from storage.fsapply import apply
from storage.fsstate import ROOT_INO, FsState, conflict_ino, ino_for
from storage.records import (FileType, Link, MkInode, Rename, SetAttr, SetXattr, Unlink, Write,
                             make_record)
from storage.replica import LateRecord, Replica
from storage.vv import VV


class Writer:
    """A simulated writer: numbers its records and tracks what it has seen."""

    def __init__(self, n: int):
        self.id = bytes([n + 1]) * 32
        self.index = n
        self.seq = 0
        self.vv = VV()
        self.inos = 0

    def see(self, *recs):
        for r in recs:
            self.vv = self.vv.merge(r.vv)

    def rec(self, body):
        self.seq += 1
        r = make_record(self.id, self.seq, self.vv, 1000 * self.seq + self.index, body)
        self.vv = r.vv
        return r

    def ino(self):
        self.inos += 1
        return ino_for(self.index, self.inos)

    def create(self, d, name, ftype=FileType.REG, target=None):
        i = self.ino()
        return i, [self.rec(MkInode(i, ftype, 0o644, 0, 0, target)), self.rec(Link(d, name, i))]


def replay(records) -> FsState:
    st_ = FsState()
    for r in sorted(records, key=lambda r: r.key):
        apply(st_, r)
    st_.check()
    return st_


def content(st_: FsState, ino: int) -> bytes:
    n = st_.inodes[ino]
    buf = bytearray(n.size)
    for e in n.data.plan(0, n.size):
        buf[e.off:e.end] = e.src[e.soff:e.soff + e.length]
    return bytes(buf)


def names(st_, d=ROOT_INO):
    return sorted(st_.inodes[d].entries)


# --------------------------------------------------------------------------
# Extents


def test_extents_write_punch_and_undo():
    x = Extents()
    assert x.write(0, 10, b"aaaaaaaaaa") == []
    removed = x.write(3, 4, b"BBBB")
    assert removed == [Extent(3, 7, b"aaaaaaaaaa", 3)]
    assert [(e.off, e.end) for e in x] == [(0, 3), (3, 7), (7, 10)]
    plan = x.plan(2, 8)
    assert [(e.off, e.end, e.soff) for e in plan] == [(2, 3, 2), (3, 7, 0), (7, 8, 7)]
    before = x.copy()
    undo = Undo(10, 5, 20, x.write(5, 15, Blk(b"g" * 32)))
    assert x.end == 20 and x.blocks() == {b"g" * 32}
    assert revert(x, undo) == 10 and x == before
    assert x.punch(0, 100) and len(x) == 0


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), max_size=12))
def test_extents_match_a_bytearray(writes):
    x, ref, undos = Extents(), bytearray(60), []
    for i, (off, n) in enumerate(writes):
        data = bytes([65 + i]) * n
        snapshot = (x.copy(), bytes(ref))
        undos.append((snapshot, Undo(0, off, off + n, x.write(off, n, data))))
        ref[off:off + n] = data
        got = bytearray(60)
        for e in x.plan(0, 60):
            got[e.off:e.end] = e.src[e.soff:e.soff + e.length]
        assert got == ref
    for (before, _), (_, u) in reversed(list(zip(undos, undos))):
        revert(x, u)
        assert x == before[0]


# --------------------------------------------------------------------------
# Single writer: POSIX effects


def test_create_write_rename_unlink():
    a = Writer(0)
    f, rs = a.create(ROOT_INO, b"f")
    d, rs2 = a.create(ROOT_INO, b"d", FileType.DIR)
    rs += rs2
    rs += [a.rec(Write(f, 0, data=b"hello world")), a.rec(Write(f, 6, data=b"WORLD!")),
           a.rec(SetAttr(f, size=9)), a.rec(SetXattr(f, b"user.k", b"v")),
           a.rec(Rename(ROOT_INO, b"f", f, d, b"g")), a.rec(Link(ROOT_INO, b"h", f))]
    s = replay(rs)
    assert names(s) == [b"d", b"h"] and names(s, d) == [b"g"]
    n = s.inodes[f]
    assert content(s, f) == b"hello WOR" and n.nlink == 2 and n.xattrs == {b"user.k": b"v"}
    assert n.mtime == rs[6].time and s.inodes[d].st_nlink == 2 and s.inodes[ROOT_INO].st_nlink == 3
    s2 = replay(rs + [a.rec(Unlink(ROOT_INO, b"h", f)), a.rec(Unlink(d, b"g", f))])
    assert f not in s2.inodes and f in s2.tombs and not s2.conflicts
    s3 = replay(rs + [a.rec(Unlink(ROOT_INO, b"d", d))])  # rmdir of a non-empty dir: skipped
    assert b"d" in names(s3) and s3.skipped


def test_rename_over_existing_and_exchange():
    a = Writer(0)
    f, rs = a.create(ROOT_INO, b"f")
    g, rs2 = a.create(ROOT_INO, b"g")
    rs += rs2 + [a.rec(Rename(ROOT_INO, b"f", f, ROOT_INO, b"g", g))]
    s = replay(rs)
    assert names(s) == [b"g"] and s.lookup(ROOT_INO, b"g") == f and g in s.tombs
    h, rs3 = a.create(ROOT_INO, b"h")
    rs += rs3 + [a.rec(Rename(ROOT_INO, b"g", f, ROOT_INO, b"h", h, True))]
    s = replay(rs)
    assert s.lookup(ROOT_INO, b"g") == h and s.lookup(ROOT_INO, b"h") == f


def test_faulty_records_are_skipped_not_fatal():
    a = Writer(0)
    f, rs = a.create(ROOT_INO, b"f")
    rs += [a.rec(Write(424242, 0, data=b"x")), a.rec(Link(f, b"y", f)),
           a.rec(MkInode(f, FileType.REG, 0, 0, 0)), a.rec(Unlink(ROOT_INO, b"zz", f)),
           a.rec(Rename(ROOT_INO, b"nope", 77, ROOT_INO, b"q"))]
    s = replay(rs)
    assert names(s) == [b"f"] and len(s.skipped) >= 4


def test_inode_numbers():
    assert ino_for(0, 1) == (1 << 40) | 1 and ino_for(3, 7) == (4 << 40) | 7
    with pytest.raises(ValueError):
        ino_for(0, 0)
    from storage.vv import Dot
    c = conflict_ino(Dot(b"w" * 32, 3))
    assert c >> 63 == 1 and c != conflict_ino(Dot(b"w" * 32, 4))


# --------------------------------------------------------------------------
# Concurrent records: conflict rules


def two_writers_sharing_a_file():
    a, b = Writer(0), Writer(1)
    f, base = a.create(ROOT_INO, b"doc")
    base.append(a.rec(Write(f, 0, data=b"0123456789")))
    b.see(*base)
    return a, b, f, base


def test_concurrent_creates_of_one_name_keep_both():
    a, b = Writer(0), Writer(1)
    fa, ra = a.create(ROOT_INO, b"x")
    fb, rb = b.create(ROOT_INO, b"x")
    ra.append(a.rec(Write(fa, 0, data=b"from a")))
    rb.append(b.rec(Write(fb, 0, data=b"from b")))
    s = replay(ra + rb)
    first = min(ra[1], rb[1], key=lambda r: r.key)
    winner = fa if first is ra[1] else fb
    loser = fb if winner == fa else fa
    assert s.lookup(ROOT_INO, b"x") == winner
    (c,) = s.conflicts
    assert c.kind == "name" and c.name == b"x" and s.lookup(ROOT_INO, c.copy_name) == loser
    assert c.copy_name.startswith(b"x.conflict-")
    assert {content(s, fa), content(s, fb)} == {b"from a", b"from b"}


def test_concurrent_writes_to_one_file_keep_both_versions():
    a, b, f, base = two_writers_sharing_a_file()
    ra = [a.rec(Write(f, 0, data=b"AAAA")), a.rec(Write(f, 8, data=b"AA"))]
    rb = [b.rec(Write(f, 2, data=b"BB")), b.rec(SetAttr(f, size=5)), b.rec(Write(f, 5, data=b"B"))]
    s = replay(base + ra + rb)
    a_version = b"AAAA4567AA"
    b_version = b"01BB4B"
    a_first = ra[0].key < rb[0].key
    assert content(s, f) == (a_version if a_first else b_version)
    (c,) = s.conflicts
    assert c.kind == "data" and c.ino == f
    assert content(s, c.copy_ino) == (b_version if a_first else a_version)
    assert s.lookup(ROOT_INO, c.copy_name) == c.copy_ino
    # A writer who saw both resolves: its write goes to the file, the copy stays.
    a.see(*rb)
    s2 = replay(base + ra + rb + [a.rec(Write(f, 0, data=b"Z"))])
    assert content(s2, f)[:1] == b"Z" and len(s2.conflicts) == 1
    assert s2.inodes[f].copies == []


def test_delete_concurrent_with_write_keeps_the_file():
    a, b, f, base = two_writers_sharing_a_file()
    ra = [a.rec(Unlink(ROOT_INO, b"doc", f))]
    rb = [b.rec(Write(f, 0, data=b"new"))]
    s = replay(base + ra + rb)
    (c,) = s.conflicts
    assert c.kind == "delete" and f in s.inodes and content(s, f) == b"new3456789"
    assert s.lookup(ROOT_INO, c.copy_name) == f


def test_rmdir_concurrent_with_create_inside_keeps_the_directory():
    a, b = Writer(0), Writer(1)
    d, base = a.create(ROOT_INO, b"d", FileType.DIR)
    b.see(*base)
    ra = [a.rec(Unlink(ROOT_INO, b"d", d))]
    f, rb = b.create(d, b"inside")
    s = replay(base + ra + rb)
    assert s.lookup(ROOT_INO, b"d") == d or any(c.kind == "delete" for c in s.conflicts)
    assert s.path_of(f) is not None and s.path_of(f).endswith(b"/inside")


def test_crossing_directory_renames_make_no_cycle():
    a, b = Writer(0), Writer(1)
    x, base = a.create(ROOT_INO, b"x", FileType.DIR)
    y, more = a.create(ROOT_INO, b"y", FileType.DIR)
    base += more
    b.see(*base)
    ra = [a.rec(Rename(ROOT_INO, b"x", x, y, b"x"))]
    rb = [b.rec(Rename(ROOT_INO, b"y", y, x, b"y"))]
    s = replay(base + ra + rb)  # check() inside: everything reachable, no loop
    assert [c.kind for c in s.conflicts] == ["skipped"]


def test_concurrent_renames_of_one_entry_first_wins():
    a, b, f, base = two_writers_sharing_a_file()
    ra = [a.rec(Rename(ROOT_INO, b"doc", f, ROOT_INO, b"by-a"))]
    rb = [b.rec(Rename(ROOT_INO, b"doc", f, ROOT_INO, b"by-b"))]
    s = replay(base + ra + rb)
    first = min(ra[0], rb[0], key=lambda r: r.key)
    assert names(s) == [first.body.dname] and s.conflicts[0].kind == "skipped"


def test_later_ops_of_the_losing_side_follow_their_own_entry():
    """B's entry got a conflict name; B's later unlink (by inode) removes
    B's entry, not the winner's."""
    a, b = Writer(0), Writer(1)
    fa, ra = a.create(ROOT_INO, b"x")
    fb, rb = b.create(ROOT_INO, b"x")
    rb.append(b.rec(Unlink(ROOT_INO, b"x", fb)))
    s = replay(ra + rb)
    winner = fa if ra[1].key < rb[1].key else fb
    if winner == fa:
        assert names(s) == [b"x"] and s.lookup(ROOT_INO, b"x") == fa
    else:  # B's entry won the name and B then removed it; A's is at the conflict name
        assert [s.lookup(ROOT_INO, n) for n in names(s)] == [fa]


# --------------------------------------------------------------------------
# Determinism under any arrival order (hypothesis)


NAMES = [b"a", b"b", b"c"]


class SimWriter(Writer):
    """A writer that generates plausible operations from its own view."""

    def __init__(self, n):
        super().__init__(n)
        self.known: list = []
        self.state = FsState()

    def learn(self, recs):
        new = [r for r in recs if r not in self.known]
        self.known += new
        self.see(*new)
        self.state = replay(self.known)

    def op(self, rnd: random.Random):
        s = self.state
        dirs = [i for i, n in s.inodes.items() if n.is_dir]
        files = [i for i, n in s.inodes.items() if n.ftype == FileType.REG]
        entries = [(d, nm, e.ino) for d in dirs for nm, e in s.inodes[d].entries.items()]
        k = rnd.randrange(8)
        out = []
        if k <= 1 or not entries:
            d = rnd.choice(dirs)
            nm = rnd.choice(NAMES)
            if nm not in s.inodes[d].entries:
                _, out = self.create(d, nm, rnd.choice([FileType.REG, FileType.DIR]))
        elif k == 2 and files:
            f = rnd.choice(files)
            out = [self.rec(Write(f, rnd.randrange(6), data=bytes([65 + self.index]) * 3))]
        elif k == 3 and files:
            out = [self.rec(SetAttr(rnd.choice(files), size=rnd.randrange(5), mode=0o600))]
        elif k == 4:
            d, nm, i = rnd.choice(entries)
            if not (s.inodes[i].is_dir and s.inodes[i].entries):
                out = [self.rec(Unlink(d, nm, i))]
        elif k == 5:
            d, nm, i = rnd.choice(entries)
            dd = rnd.choice(dirs)
            if not (s.inodes[i].is_dir and s.is_ancestor(i, dd)):
                dn = rnd.choice(NAMES)
                t = s.inodes[dd].entries.get(dn)
                if t is None or (not s.inodes[t.ino].is_dir and not s.inodes[i].is_dir
                                 and t.ino != i):
                    out = [self.rec(Rename(d, nm, i, dd, dn, t.ino if t else None))]
        elif k == 6 and files:
            f = rnd.choice(files)
            d = rnd.choice(dirs)
            nm = rnd.choice(NAMES)
            if nm not in s.inodes[d].entries and s.inodes[f].links:
                out = [self.rec(Link(d, nm, f))]
        elif files:
            out = [self.rec(SetXattr(rnd.choice(files), b"user.x", bytes([self.index])))]
        if out:
            self.learn(out)
        return out


def simulate(seed: int, steps: int, nwriters: int = 3):
    rnd = random.Random(seed)
    ws = [SimWriter(i) for i in range(nwriters)]
    logs = {w.id: [] for w in ws}
    for _ in range(steps):
        w = rnd.choice(ws)
        if rnd.random() < 0.25:  # w learns everything another writer has written
            o = rnd.choice(ws)
            w.learn(o.known)
        else:
            logs[w.id] += w.op(rnd)
    return ws, logs


@settings(max_examples=int(__import__("os").environ.get("FS_EXAMPLES", 25)), deadline=None)
@given(st.integers(0, 2**32), st.integers(10, 60), st.integers(0, 2**32))
def test_any_arrival_order_gives_the_same_state(seed, steps, order_seed):
    ws, logs = simulate(seed, steps)
    rnd = random.Random(order_seed)
    everything = [r for lst in logs.values() for r in lst]
    reference = replay(everything)
    # Deliver each log in random chunks, interleaved at random, to a replica
    # that settles with honest promises (each writer's latest vector).
    rep = Replica()
    rep.set_active({w.id for w in ws})
    cursor = {w: 0 for w in logs}
    while any(cursor[w] < len(logs[w]) for w in logs):
        batch = []
        for w in logs:
            n = rnd.randint(0, 3)
            chunk = logs[w][cursor[w]:cursor[w] + n]
            cursor[w] += len(chunk)
            batch += chunk
        rep.add(batch)
        for w in logs:
            if cursor[w]:
                rep.promise(w, logs[w][cursor[w] - 1].vv)
        if rnd.random() < 0.5:
            rep.settle()
        rep.current.check()
    rep.settle()
    assert rep.current.canonical() == reference.canonical()
    # And the settled base equals the replay of exactly the settled records.
    settled = [r for r in everything if rep.base_cover.sees(r.dot)]
    assert rep.base.canonical()[:2] == replay(settled).canonical()[:2]


def test_late_record_is_refused():
    a, b = Writer(0), Writer(1)
    _, ra = a.create(ROOT_INO, b"x")
    rb = [b.rec(MkInode(ino_for(1, 1), FileType.REG, 0, 0, 0))]  # concurrent, sorts early
    rep = Replica()
    rep.set_active({a.id, b.id})
    rep.add(ra)
    rep.promise(b.id, ra[-1].vv)   # b promised (falsely) to have seen a's records
    rep.promise(a.id, ra[-1].vv)
    assert rep.settle() == 2
    with pytest.raises(LateRecord):
        rep.add(rb)


def test_rollback_replays_from_the_settled_base():
    a, b = Writer(0), Writer(1)
    _, ra = a.create(ROOT_INO, b"x")
    ra += [a.rec(SetXattr(ra[0].body.ino, b"user.n", b"%d" % i)) for i in range(5)]
    _, rb = b.create(ROOT_INO, b"y")
    rep = Replica()
    rep.set_active({a.id, b.id})
    rep.add(ra)
    rep.add(rb)       # b's records sort before a's later ones: replay
    assert rep.rollbacks == 1
    assert rep.current.canonical() == replay(ra + rb).canonical()


def test_a_writer_may_create_inodes_only_in_its_own_range():
    a, b = Writer(0), Writer(1)
    st_ = FsState()
    st_.ranges = {a.id: 1, b.id: 2}
    theirs = ino_for(0, 5)                      # a's range, claimed by b
    for r in [b.rec(MkInode(theirs, FileType.REG, 0, 0, 0)), b.rec(Link(ROOT_INO, b"x", theirs))]:
        apply(st_, r)
    assert theirs not in st_.inodes and names(st_) == []
    f, rs = b.create(ROOT_INO, b"ok")
    for r in rs:
        apply(st_, r)
    assert names(st_) == [b"ok"]
