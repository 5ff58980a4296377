"""Time travel (storage/history.py, storage/timetravel.py, storage/facts.py):
every past version of a volume, read-only, over the in-process block store
(real sealing) and head board, with deterministic writer clocks."""

import errno
import os
import stat

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.wire.ids import Identity
from storage.facts import facts, is_fact
from storage.fs_errors import FsError
from storage.fsstate import CONFLICT_BIT, ROOT_INO
from storage.history import History, Point
from storage.localblocks import MemoryBlockAccess
from storage.logs import MemoryHeadBoard
from storage.namespace import Namespace
from storage.timenames import (MAX_LISTED, coarsen, parse_time, point_name, tier_of,
                               time_text)
from storage.timetravel import (DIR_NAME, INO_LIMIT, LATEST, MUTATIONS, SNAPSHOTS_INO,
                                HistoricalView, TimeTravel)
from storage.volume import create_volume
from storage.vv import VV

T0 = 1_795_000_000_000_000_000          # 2026-11-18, in ns
MS = 1_000_000


class Clock:
    """A writer clock that steps one millisecond per reading (``frozen``: not at all)."""

    def __init__(self):
        self.now = T0
        self.frozen = False

    def __call__(self):
        if not self.frozen:
            self.now += MS
        return self.now


class Net:
    def __init__(self, nwriters=1):
        self.ids = [Identity.from_seed(b"history writer %d" % i) for i in range(nwriters)]
        self.view, self.key = create_volume(self.ids[0], "history")
        for ident in self.ids[1:]:
            self.view = self.view.add_writer(self.ids[0], self.key, ident.public_key)
        self.blocks = MemoryBlockAccess(self.key)
        self.board = MemoryHeadBoard()
        self.clock = Clock()

    async def mount(self, i, **kw):
        ident = self.ids[i] if isinstance(i, int) else i
        return await Namespace.mount(self.view, ident, self.blocks, self.board,
                                     clock=self.clock, **kw)


def erofs():
    return _errno(errno.EROFS)


def _errno(code):
    class _Check:
        def __enter__(self):
            self.cm = pytest.raises(FsError)
            self.info = self.cm.__enter__()

        def __exit__(self, *exc):
            r = self.cm.__exit__(*exc)
            assert self.info.value.errno == code, self.info.value
            return r

    return _Check()


# --------------------------------------------------------------------------
# Reading trees


async def live_tree(ns, ino=ROOT_INO, prefix=b""):
    """Path -> ('d',) | ('f', bytes) | ('l', target) of the live volume."""
    out = {}
    for name, a in await ns.readdir(ino):
        p = prefix + b"/" + name
        if a.is_dir:
            out[p] = ("d",)
            out.update(await live_tree(ns, a.ino, p))
        elif stat.S_ISLNK(a.mode):
            out[p] = ("l", await ns.readlink(a.ino))
        else:
            out[p] = ("f", await ns.read(a.ino, 0, a.size + 10))
    return out


async def tt_tree(tt, ino, prefix=b"", inos=None):
    """The same through .snapshots (mount inode numbers); ``inos`` collects
    (path, mount ino)."""
    out = {}
    for name, a in await tt.readdir(ino):
        p = prefix + b"/" + name
        assert tt.owns(a.ino)
        assert (await tt.lookup(ino, name)).ino == a.ino
        if inos is not None:
            inos.append((p, a.ino))
        if a.is_dir:
            out[p] = ("d",)
            out.update(await tt_tree(tt, a.ino, p, inos))
        elif stat.S_ISLNK(a.mode):
            out[p] = ("l", await tt.readlink(a.ino))
        else:
            out[p] = ("f", await tt.read(a.ino, 0, a.size + 10))
    return out


async def version_tree(tt, point, inos=None):
    return await tt_tree(tt, tt.mount_ino(point), b"", inos)


async def latest_after_sync(tt):
    """The newest version once the session has published (what a sync made)."""
    await tt.refresh()
    return tt.history.latest()


def describe_points(h):
    return [(p.name, p.cover, p.count, p.key, p.time_ns, p.snapshot) for p in h.versions()]


async def walk_to(ns, path):
    """(parent inode, name) of a path in the live volume."""
    parts = path.strip(b"/").split(b"/")
    ino = ROOT_INO
    for part in parts[:-1]:
        ino = (await ns.lookup(ino, part)).ino
    return ino, parts[-1]


# --------------------------------------------------------------------------
# One writer


async def test_every_sync_is_a_version_showing_the_tree_of_then():
    net = Net(1)
    a = await net.mount(0)
    tt = TimeTravel(a)
    seen = []                                   # (point, model) after each sync

    async def synced():
        await a.sync()
        p = await latest_after_sync(tt)
        seen.append((p, await live_tree(a)))

    d = await a.mkdir(ROOT_INO, b"docs", 0o755, 0, 0)
    f = await a.create(d.ino, b"plan.txt", 0o644, 0, 0)
    await a.write(f.ino, 0, b"first plan")
    await synced()
    await a.symlink(ROOT_INO, b"ln", b"docs/plan.txt", 0, 0)
    big = await a.create(ROOT_INO, b"big", 0o600, 0, 0)
    await a.write(big.ino, 0, bytes(range(256)) * 400)       # DATA blocks
    await synced()
    await a.write(f.ino, 6, b"PLAN, revised")
    await a.write(big.ino, 65000, b"X" * 20000)
    await synced()
    await a.rename(d.ino, b"plan.txt", ROOT_INO, b"plan")
    await a.setattr(big.ino, size=1000)
    await synced()
    await a.unlink(ROOT_INO, b"plan")
    await a.rmdir(ROOT_INO, b"docs")
    await synced()

    assert len({p.cover for p, _ in seen}) == len(seen)
    # the volume as created (its first log block, the owner's End record), then each sync
    created, *rest = tt.history.versions()
    assert created.count == 1 and await version_tree(tt, created) == {}
    assert [p.cover for p, _ in seen] == [p.cover for p in rest]
    for p, model in seen:
        assert await version_tree(tt, p) == model, p.name
    # .snapshots lists them all (few versions: nothing coarsened) and latest
    fresh = TimeTravel(a)
    await fresh.refresh()
    listing = await fresh.readdir(SNAPSHOTS_INO)
    names = [n for n, _ in listing]
    assert names == [LATEST] + [p.name.encode() for p in [created] + [p for p, _ in seen]]
    for _, at in listing:                           # ls -l .snapshots computes no version
        assert (await fresh.getattr(at.ino)).ino == at.ino
    assert fresh.history.replayed == 0
    assert (await fresh.getattr(SNAPSHOTS_INO)).nlink == 2 + len(seen) + 1
    latest = await tt.lookup(SNAPSHOTS_INO, LATEST)
    assert stat.S_ISLNK(latest.mode)
    assert await tt.readlink(latest.ino) == seen[-1][0].name.encode()
    assert all(tt.history.is_settled(p) for p, _ in seen)        # one writer
    # the newest version is the live volume
    assert await version_tree(tt, seen[-1][0]) == await live_tree(a)


async def test_reads_of_a_file_as_it_was_before_each_change():
    net = Net(1)
    a = await net.mount(0)
    tt = TimeTravel(a)
    f = await a.create(ROOT_INO, b"f", 0o644, 0, 0)
    big = b"".join(b"%07d\n" % i for i in range(20000))      # 160 KB: DATA blocks
    await a.write(f.ino, 0, big)
    await a.setxattr(f.ino, b"user.color", b"blue")
    await a.sync()
    p1 = await latest_after_sync(tt)
    await a.write(f.ino, 100000, b"OVERWRITTEN")             # overwrite
    await a.setxattr(f.ino, b"user.color", b"red")
    await a.sync()
    p2 = await latest_after_sync(tt)
    await a.setattr(f.ino, size=10)                           # truncate
    await a.sync()
    p3 = await latest_after_sync(tt)
    await a.rename(ROOT_INO, b"f", ROOT_INO, b"g")            # rename
    await a.sync()
    p4 = await latest_after_sync(tt)
    await a.unlink(ROOT_INO, b"g")                            # unlink
    await a.sync()
    p5 = await latest_after_sync(tt)

    async def content(p, name):
        a_ = await tt.lookup(tt.mount_ino(p), name)
        return await tt.read(a_.ino, 0, 1 << 20), await tt.getxattr(a_.ino, b"user.color")

    after = big[:100000] + b"OVERWRITTEN" + big[100011:]
    assert await content(p1, b"f") == (big, b"blue")
    assert await content(p2, b"f") == (after, b"red")
    assert await content(p3, b"f") == (after[:10], b"red")
    assert await content(p4, b"g") == (after[:10], b"red")
    with _errno(errno.ENOENT):
        await tt.lookup(tt.mount_ino(p4), b"f")
    assert await tt.readdir(tt.mount_ino(p5)) == []
    # a read in the middle of a block, and past the end
    fi = (await tt.lookup(tt.mount_ino(p2), b"f")).ino
    assert await tt.read(fi, 99990, 30) == after[99990:100020]
    assert await tt.read(fi, len(big) + 5, 10) == b""
    # the live volume has none of it
    with _errno(errno.ENOENT):
        await a.lookup(ROOT_INO, b"g")


# --------------------------------------------------------------------------
# Two writers


async def test_two_writers_syncing_between_and_points_agree_across_clients():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    ta, tb = TimeTravel(a), TimeTravel(b)
    seen = []

    async def turn(ns, tt, work):
        await ns.refresh()
        await work(ns)
        await ns.sync()
        p = await latest_after_sync(tt)
        seen.append((p.cover, await live_tree(ns)))

    async def a1(ns):
        d = await ns.mkdir(ROOT_INO, b"shared", 0o755, 0, 0)
        f = await ns.create(d.ino, b"notes", 0o644, 0, 0)
        await ns.write(f.ino, 0, b"from a")

    async def b1(ns):
        d = (await ns.lookup(ROOT_INO, b"shared")).ino
        f = (await ns.lookup(d, b"notes")).ino
        await ns.write(f, 0, b"FROM B, longer")
        g = await ns.create(d, b"b-file", 0o644, 0, 0)
        await ns.write(g.ino, 0, b"b" * 30000)

    async def a2(ns):
        d = (await ns.lookup(ROOT_INO, b"shared")).ino
        await ns.rename(d, b"notes", ROOT_INO, b"notes-moved")
        await ns.unlink(d, b"b-file")

    async def b2(ns):
        f = (await ns.lookup(ROOT_INO, b"notes-moved")).ino
        await ns.setattr(f, size=4)
        await ns.link(f, ROOT_INO, b"hard")

    await turn(a, ta, a1)
    await turn(b, tb, b1)
    await turn(a, ta, a2)
    await turn(b, tb, b2)
    await a.refresh()
    await b.refresh()
    await a.sync()
    await ta.refresh()
    await tb.refresh()
    c = await net.mount(Identity.from_seed(b"a reader"))     # not a writer: read-only
    tc = TimeTravel(c)
    await tc.refresh()
    assert describe_points(ta.history) == describe_points(tb.history) \
        == describe_points(tc.history)
    assert len(ta.history.versions()) >= 4
    for tt in (ta, tb, tc):
        for cover, model in seen:
            p = tt.history.at_cover(cover)
            assert p is not None
            assert await version_tree(tt, p) == model
    assert set(describe_points(ta.history)[-1][1]) == {net.ids[0].id, net.ids[1].id}
    # names are points everybody shares
    for p in ta.history.versions():
        assert tb.history.version(p.name).cover == p.cover


async def test_concurrent_writers_merge_and_every_point_is_a_prefix():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    f = await a.create(ROOT_INO, b"doc", 0o644, 0, 0)
    await a.write(f.ino, 0, b"original")
    await a.sync()
    await b.refresh()
    await a.refresh()
    # concurrent: neither refreshes
    await a.write(f.ino, 0, b"ORIGINAL by a")
    await a.create(ROOT_INO, b"only-a", 0o644, 0, 0)
    await a.sync()
    await b.setattr(f.ino, size=0)
    await b.write(f.ino, 0, b"rewritten by b")
    await b.mkdir(ROOT_INO, b"only-b", 0o755, 0, 0)
    await b.sync()
    for _ in range(2):
        await a.refresh()
        await b.refresh()
    ta, tb = TimeTravel(a), TimeTravel(b)
    await ta.refresh()
    await tb.refresh()
    assert describe_points(ta.history) == describe_points(tb.history)
    assert a.conflicts() and b.conflicts()
    live = await live_tree(a)
    assert live == await live_tree(b)
    assert await version_tree(ta, ta.history.latest()) == live
    # every version is the plain replay of a prefix of the one order
    plain = History(a, use_snapshots=False, cache_states=1)
    await plain.refresh()
    for p in ta.history.versions():
        assert p.count == p.cover.total
        assert [r.key for r in plain.order[:p.count]][-1] == p.key
        st = await plain.state_at(p)
        st.check()
        assert st.canonical() == (await ta.history.state_at(p)).canonical()
    # a conflict copy's creating writer is the loser's
    (c,) = [c for c in a.conflicts() if c.kind == "data"]
    assert c.copy_ino & CONFLICT_BIT
    assert facts(a, c.copy_ino)["user.p2pfs.writer"] == c.loser.writer.hex().encode()


# --------------------------------------------------------------------------
# Inode numbers, read-only, names


async def test_inode_numbers_of_versions_never_collide_with_live_ones():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    f = await a.create(ROOT_INO, b"f", 0o644, 0, 0)
    await a.write(f.ino, 0, b"one")
    await a.link(f.ino, ROOT_INO, b"f-again")
    await a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await a.sync()
    await b.refresh()
    await b.create(ROOT_INO, b"from-b", 0o644, 0, 0)
    await a.write(f.ino, 0, b"TWO")                 # concurrent with b: a conflict copy
    await b.write(f.ino, 0, b"two")
    await a.sync()
    await b.sync()
    await a.refresh()
    await b.refresh()
    await a.refresh()
    tt = TimeTravel(a)
    await tt.refresh()
    live = {ROOT_INO}
    stack = [ROOT_INO]
    while stack:
        for _, at in await a.readdir(stack.pop()):
            live.add(at.ino)
            if at.is_dir:
                stack.append(at.ino)
    assert any(i & CONFLICT_BIT for i in live)
    hist = {SNAPSHOTS_INO}
    per_version = []
    for p in tt.history.versions():
        inos = []
        await version_tree(tt, p, inos)
        per_version.append(dict(inos))
        hist.add(tt.mount_ino(p))
        hist.update(i for _, i in inos)
        # hard links in one version: one number
        if b"/f-again" in dict(inos):
            assert dict(inos)[b"/f"] == dict(inos)[b"/f-again"]
    alias = await tt.lookup(SNAPSHOTS_INO, LATEST)
    hist.add(alias.ino)
    assert not hist & live
    assert all(2 <= i < INO_LIMIT and tt.owns(i) for i in hist)
    assert not any(tt.owns(i) for i in live)
    # the same file in two versions: two numbers; looked up again: the same one
    assert per_version[0] == {}                               # the volume as created
    assert per_version[1][b"/f"] != per_version[-1][b"/f"]
    p0 = tt.history.versions()[1]
    assert (await tt.lookup(tt.mount_ino(p0), b"f")).ino == per_version[1][b"/f"]
    # '..' leads out of a version to .snapshots, and from there to the live root
    assert (await tt.lookup(tt.mount_ino(p0), b"..")).ino == SNAPSHOTS_INO
    assert (await tt.lookup(SNAPSHOTS_INO, b"..")).ino == ROOT_INO
    d = (await tt.lookup(tt.mount_ino(p0), b"d")).ino
    assert (await tt.lookup(d, b"..")).ino == tt.mount_ino(p0)
    assert (await tt.lookup(ROOT_INO, DIR_NAME)).ino == SNAPSHOTS_INO
    # forgotten numbers are not reused
    old = per_version[1][b"/f"]
    tt.forget(old)
    with _errno(errno.ENOENT):
        await tt.getattr(old)
    new = (await tt.lookup(tt.mount_ino(p0), b"f")).ino
    assert new != old and new not in hist


async def test_every_mutation_is_refused_read_only():
    net = Net(1)
    a = await net.mount(0)
    f = await a.create(ROOT_INO, b"f", 0o644, 0, 0)
    await a.write(f.ino, 0, b"data")
    await a.sync()
    tt = TimeTravel(a)
    p = await latest_after_sync(tt)
    root = tt.mount_ino(p)
    fi = (await tt.lookup(root, b"f")).ino
    before = await live_tree(a)
    view = HistoricalView(tt.history, p)
    calls = {
        "create": (root, b"n", 0o644, 0, 0), "mknod": (root, b"n", 0o100644, 0, 0, 0),
        "mkdir": (root, b"n", 0o755, 0, 0), "symlink": (root, b"n", b"t", 0, 0),
        "link": (fi, root, b"n"), "unlink": (root, b"f"), "rmdir": (root, b"f"),
        "rename": (root, b"f", root, b"g"), "setattr": (fi,), "write": (fi, 0, b"x"),
        "setxattr": (fi, b"user.x", b"1"), "removexattr": (fi, b"user.x"),
    }
    assert set(calls) == set(MUTATIONS)
    for target, ino_of in ((tt, lambda i: i), (view, lambda i: ROOT_INO if i == root else f.ino)):
        for op, args in calls.items():
            args = tuple(ino_of(x) if x in (root, fi) and type(x) is int else x for x in args)
            with erofs():
                await getattr(target, op)(*args)
        with erofs():
            await target.open(ino_of(fi), write=True)
        await target.fsync(ino_of(fi))                 # nothing to do, no error
    with erofs():
        await tt.mkdir(SNAPSHOTS_INO, b"x", 0o755, 0, 0)
    with erofs():
        await tt.setattr(SNAPSHOTS_INO, mode=0o777)
    assert await tt.read(fi, 0, 10) == b"data"
    assert await live_tree(a) == before
    assert await a.read(f.ino, 0, 10) == b"data"


async def test_names_in_one_millisecond_and_lookups_as_of_a_time():
    net = Net(1)
    a = await net.mount(0)
    tt = TimeTravel(a)
    points = []
    f = await a.create(ROOT_INO, b"f", 0o644, 0, 0)
    for i, text in enumerate([b"v1", b"v2", b"v3", b"v4"]):
        net.clock.frozen = i in (1, 2)               # v2 and v3 in one millisecond
        if i == 3:
            net.clock.now += 10 * MS
        await a.write(f.ino, 0, text)
        await a.sync()
        points.append(await latest_after_sync(tt))
    base = time_text(points[1].time_ns)
    assert points[1].time_ns // MS == points[2].time_ns // MS
    assert [p.name for p in points[1:3]] == [base, base + "~2"]
    assert points[0].name < points[1].name < points[3].name
    for p, text in zip(points, [b"v1", b"v2", b"v3", b"v4"]):
        fi = (await tt.lookup(SNAPSHOTS_INO, p.name.encode())).ino
        assert stat.S_ISDIR((await tt.getattr(fi)).mode)
        assert await tt.read((await tt.lookup(fi, b"f")).ino, 0, 9) == text
    # as of a time: a symlink to the newest version at or before it
    between = time_text(points[3].time_ns - MS).encode()
    assert tt.history.version(between.decode()) is None
    al = await tt.lookup(SNAPSHOTS_INO, between)
    assert stat.S_ISLNK(al.mode) and await tt.readlink(al.ino) == (base + "~2").encode()
    day = time_text(points[0].time_ns)[:10].encode()           # YYYY-MM-DD: that midnight
    with _errno(errno.ENOENT):
        await tt.lookup(SNAPSHOTS_INO, day)
    whole_minute = (time_text(points[3].time_ns)[:16] + "Z").encode()
    assert parse_time(whole_minute.decode())[0] * MS <= points[3].time_ns
    with _errno(errno.ENOENT):
        await tt.lookup(SNAPSHOTS_INO, b"2026-13-01")              # not a date
    with _errno(errno.ENOENT):
        await tt.lookup(SNAPSHOTS_INO, (base + "~9").encode())     # no such rank
    with _errno(errno.ENOENT):
        await tt.lookup(SNAPSHOTS_INO, b"\xff\xfe")
    # time names
    assert time_text(0) == "1970-01-01T00:00:00.000Z"
    assert time_text(T0 + 7 * MS) == "2026-11-18T11:06:40.007Z"
    assert parse_time("2026-11-18T11:06:40.007Z~3") == ((T0 + 7 * MS) // MS, 3)
    assert parse_time("2026-11-18") == (parse_time("2026-11-18T00:00:00.000Z")[0], None)
    assert parse_time("2026-11-18T05:46Z~2") is None and parse_time("latest") is None
    assert point_name(T0, 1) == time_text(T0) and point_name(T0, 2) == time_text(T0) + "~2"


def _pt(t_ns, i):
    return Point(f"p{i}", t_ns, VV({b"w" * 32: i + 1}), i + 1, (i + 1, b"w" * 32, i + 1),
                 b"w" * 32, 0)


def test_coarsening_keeps_recent_versions_and_thins_old_ones():
    s, minute, hour, day = 10**9, 60 * 10**9, 3600 * 10**9, 86400 * 10**9
    newest = 1_800_000_000 * s
    times = sorted({newest - k * 7 * s for k in range(0, 3000)}          # ~6 hours, 7 s apart
                   | {newest - 2 * day - k * 13 * minute for k in range(0, 500)}
                   | {newest - 40 * day - k * 5 * hour for k in range(0, 300)})
    pts = [_pt(t, i) for i, t in enumerate(times)]
    kept = coarsen(pts, cap=10**6)
    ages = [newest - p.time_ns for p in kept]
    assert kept[-1] is pts[-1]
    recent = [p for p in pts if newest - p.time_ns < hour]
    assert recent == [p for p in kept if newest - p.time_ns < hour]
    # at most one per minute within a day, per hour within 30 days, per day beyond
    for lo, hi, width in ((hour, day, minute), (day, 30 * day, hour), (30 * day, None, day)):
        zone = [p.time_ns // width for p, age in zip(kept, ages)
                if age >= lo and (hi is None or age < hi)]
        assert len(zone) == len(set(zone)) and zone
    # a newer version drops no listed one, except where it or the version
    # after it ages into a coarser tier
    later = pts + [_pt(newest + 5 * s, len(pts))]
    kept2 = set(coarsen(later, cap=10**6))
    for i, p in enumerate(pts[:-1]):
        if p in kept and all(tier_of(newest - q.time_ns) == tier_of(newest + 5 * s - q.time_ns)
                             for q in (p, pts[i + 1])):
            assert p in kept2
    assert later[-1] in kept2
    capped = coarsen(pts, cap=50)
    assert len(capped) <= 50 and capped[-1] is pts[-1]
    assert capped == sorted(capped, key=lambda p: p.time_ns)
    assert coarsen(pts, cap=1) == [pts[-1]] and coarsen([], 5) == []
    assert len(coarsen(pts[:10])) == 10 and MAX_LISTED >= 1000


# --------------------------------------------------------------------------
# Snapshots


async def test_snapshot_accelerated_reconstruction_equals_plain_replay():
    net = Net(1)
    a = await net.mount(0, snapshot_every=25)
    files = []
    for i in range(12):
        f = await a.create(ROOT_INO, b"f%02d" % i, 0o644, 0, 0)
        await a.write(f.ino, 0, b"content %d " % i * (1 + 3000 * (i % 3 == 0)))
        files.append(f.ino)
        if i % 2:
            await a.write(files[i], 2, b"rewrite %d" % i)
            await a.unlink(ROOT_INO, b"f%02d" % (i - 1))
        await a.sync()
    await a.create(ROOT_INO, b"after the last snapshot", 0o644, 0, 0)
    await a.sync()
    assert a.snapshots.last_root is not None
    fast = History(a, cache_states=1)
    slow = History(a, use_snapshots=False, cache_states=1)
    await fast.refresh()
    await slow.refresh()
    assert describe_points(fast) == describe_points(slow)
    snaps = fast.snapshots()
    assert len(snaps) >= 2 and all(s.point is not None for s in snaps)
    assert {s.root for s in snaps} >= {a.snapshots.last_root}
    newest = max(snaps, key=lambda s: s.cover.total)
    latest = fast.latest()
    assert newest.cover.total < latest.count
    st_fast = await fast.state_at(latest)
    assert fast.last_start == "snapshot" and fast.snapshot_loads == 1
    assert fast.replayed == latest.count - newest.cover.total
    st_slow = await slow.state_at(latest)
    assert slow.last_start == "empty" and slow.replayed == latest.count
    assert _observable(st_fast) == _observable(st_slow)
    # every version, both ways, reads the same
    tf, ts = TimeTravel(a, history=fast), TimeTravel(a, history=slow)
    for p in fast.versions():
        assert await version_tree(tf, p) == await version_tree(ts, slow.version(p.name))
    # a version older than every snapshot replays from the start
    first = fast.versions()[0]
    fresh = History(a, cache_states=1)
    await fresh.refresh()
    await fresh.state_at(first)
    assert fresh.last_start == "empty" and fresh.replayed == first.count
    # a snapshot that fails to load is skipped, not trusted
    broken = History(a, cache_states=1)
    await broken.refresh()
    blocks = dict(net.blocks.blocks)
    try:
        net.blocks.blocks.pop(newest.root)
        st_b = await broken.state_at(latest)
    finally:
        net.blocks.blocks.update(blocks)
    assert newest.root in broken.bad_snapshots
    assert _observable(st_b) == _observable(st_slow)


def _observable(st):
    """What readers see, without how bytes are held (snapshots pack inline data)."""
    return tuple((ino, n.st_mode, n.st_nlink, n.st_size, n.mtime, n.target,
                  tuple(sorted(n.xattrs.items())),
                  tuple(sorted((k, e.ino) for k, e in n.entries.items()))
                  if n.entries is not None else None)
                 for ino, n in sorted(st.inodes.items()))


async def test_cache_and_epochs():
    net = Net(1)
    a = await net.mount(0)
    tt = TimeTravel(a)
    for i in range(4):
        await a.create(ROOT_INO, b"f%d" % i, 0o644, 0, 0)
        await a.sync()
    await tt.refresh()
    h = tt.history
    vs = h.versions()
    await h.state_at(vs[1])
    n = h.replayed
    await h.state_at(vs[3])
    assert h.last_start == "cache" and h.replayed - n == vs[3].count - vs[1].count
    n = h.replayed
    await h.state_at(vs[1])                         # cached: nothing replayed
    assert h.replayed == n and h.cached_state(vs[1]) is not None
    assert not await tt.refresh()                   # nothing new
    # refreshes racing each other (FUSE runs operations concurrently) take turns
    for i in range(3):
        await a.create(ROOT_INO, b"g%d" % i, 0o644, 0, 0)
        await a.sync()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(tt.refresh)
    assert len(h.order) == sum(h.caps.values()) == a.log.seq
    assert len({r.dot for r in h.order}) == len(h.order)
    assert all([r.seq for r in log] == list(range(1, len(log) + 1)) for log in h.logs.values())


async def test_concurrent_records_reorder_history_and_stale_states_are_not_reused():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    for ns in (a, b, a):
        await ns.refresh()
    f = await a.create(ROOT_INO, b"from-a", 0o644, 0, 0)
    await a.write(f.ino, 0, b"a" * 10)
    await a.sync()
    await a.write(f.ino, 0, b"A" * 5)
    await a.sync()
    for i in range(3):                              # b has not seen a's records
        g = await b.create(ROOT_INO, b"from-b%d" % i, 0o644, 0, 0)
        await b.write(g.ino, 0, b"b")
    await b.sync()
    tt = TimeTravel(a)
    await tt.refresh()
    h = tt.history
    old = h.latest()
    assert not h.is_settled(old)                    # b has promised nothing about it
    old_tree = await version_tree(tt, old)
    assert old_tree == {b"/from-a": ("f", b"AAAAAaaaaa")}
    await a.refresh()
    assert await tt.refresh() and h.epoch == 1      # b's records sort among a's
    new = h.latest()
    assert old.cover <= new.cover and h.at_cover(old.cover) is None
    st = await h.state_at(new)
    assert h.last_start != "cache"                  # old's state is no prefix of new's
    plain = History(a, use_snapshots=False)
    await plain.refresh()
    assert st.canonical() == (await plain.state_at(new)).canonical()
    assert await version_tree(tt, new) == await live_tree(a)
    # the superseded version is still computed from exactly its records
    assert await tt_tree(tt, tt.mount_ino(old)) == old_tree


async def test_versions_with_records_of_a_removed_writer_are_gone():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    await b.refresh()
    await b.create(ROOT_INO, b"kept", 0o644, 0, 0)
    await b.sync()
    last_counted = b.log.seq
    await b.create(ROOT_INO, b"dropped", 0o644, 0, 0)
    await b.sync()
    await a.refresh()
    tt = TimeTravel(a)
    await tt.refresh()
    doomed = tt.history.latest()
    root = tt.mount_ino(doomed)
    assert set(await version_tree(tt, doomed)) == {b"/kept", b"/dropped"}
    view = net.view.remove_writer(net.ids[0], net.ids[1].id, last_counted)
    await a.update_view(view)
    await tt.refresh()
    assert tt.history.at_cover(doomed.cover) is None
    with _errno(errno.ENOENT):
        await tt.getattr(root)
    with _errno(errno.ENOENT):
        await tt.readdir(root)
    assert await version_tree(tt, tt.history.latest()) == await live_tree(a) \
        == {b"/kept": ("f", b"")}


# --------------------------------------------------------------------------
# Facts


async def test_facts_of_live_and_past_files():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    tt = TimeTravel(a)
    f = await a.create(ROOT_INO, b"f", 0o644, 0, 0)
    await a.write(f.ino, 0, b"small")
    await a.sync()
    await b.refresh()
    g = await b.create(ROOT_INO, b"g", 0o644, 0, 0)
    await b.write(g.ino, 0, b"G" * 70000)
    await b.write(f.ino, 5, b" and more")
    await b.sync()
    await a.refresh()
    await tt.refresh()
    fa = facts(a, f.ino, history=tt.history)
    ga = facts(a, g.ino, history=tt.history)
    ida, idb = net.ids[0].id.hex().encode(), net.ids[1].id.hex().encode()
    assert fa["user.p2pfs.writer"] == ida and ga["user.p2pfs.writer"] == idb
    assert fa["user.p2pfs.volume"] == net.view.volume.hex().encode()
    assert fa["user.p2pfs.inode"] == b"%#x" % f.ino
    wf = [r for r in tt.history.order if r.writer == net.ids[1].id][-1]
    assert fa["user.p2pfs.version"] == idb + b":%d" % wf.seq
    assert fa["user.p2pfs.blocks"] == b"" and fa["user.p2pfs.inline"] == b"14"
    blocks = ga["user.p2pfs.blocks"].split(b"\n")
    assert len(blocks) == 2 and all(len(x) == 64 for x in blocks)
    assert facts(a, ROOT_INO)["user.p2pfs.writer"] == b"root"
    assert all(is_fact(k) for k in fa) and not is_fact(b"user.color")
    # a local change not yet published is the newest version of the file
    await a.setattr(f.ino, mode=0o600)
    own = facts(a, f.ino)["user.p2pfs.version"]
    assert own == ida + b":%d" % a.log.seq
    # in the past version, the facts of then
    p0 = tt.history.versions()[1]
    fi = (await tt.lookup(tt.mount_ino(p0), b"f")).ino
    past = await tt.facts(fi)
    assert past["user.p2pfs.version"].startswith(ida) and past["user.p2pfs.inline"] == b"5"
    assert past["user.p2pfs.point"] == p0.name.encode()
    assert await tt.getxattr(fi, b"user.p2pfs.point") == p0.name.encode()
    assert await tt.listxattr(fi) == []
    with _errno(errno.ENODATA):
        await tt.getxattr(fi, b"user.p2pfs.nothing")
    with _errno(errno.ENOENT):
        facts(a, 123456789)


# --------------------------------------------------------------------------
# Property: any sequence of changes by one or two writers, synced in turns


NAMES = [b"a", b"b", b"c"]


@settings(max_examples=int(os.environ.get("HIST_EXAMPLES", 25)))
@given(st.data())
def test_random_histories_show_the_tree_of_every_sync(data):
    trio.run(_random_history, data)


async def _random_history(data):
    nw = data.draw(st.integers(1, 2), label="writers")
    net = Net(nw)
    ns = [await net.mount(i) for i in range(nw)]
    for a in ns + ns:
        await a.refresh()        # every log's start known everywhere
    model = {}
    seen = []
    who = 0

    def dirs():
        return [b""] + sorted(p for p, v in model.items() if v[0] == "d")

    def files():
        return sorted(p for p, v in model.items() if v[0] == "f")

    for _ in range(data.draw(st.integers(1, 5), label="turns")):
        w = data.draw(st.integers(0, nw - 1), label="who") if nw > 1 else 0
        if w != who:
            await ns[who].sync()
            await ns[w].refresh()
            who = w
        a = ns[w]
        for _ in range(data.draw(st.integers(1, 4), label="ops")):
            op = data.draw(st.sampled_from(["create", "mkdir", "symlink", "write", "truncate",
                                            "unlink", "rename"]))
            fs = files()
            if op in ("write", "truncate", "unlink", "rename") and not fs:
                op = "create"
            if op in ("create", "mkdir", "symlink"):
                path = data.draw(st.sampled_from(dirs())) + b"/" + data.draw(
                    st.sampled_from(NAMES))
                if path in model:
                    continue
                parent, name = await walk_to(a, path)
                if op == "create":
                    body = data.draw(st.sampled_from([b"", b"small", b"B" * 70000]))
                    at = await a.create(parent, name, 0o644, 0, 0)
                    await a.write(at.ino, 0, body)
                    model[path] = ("f", body)
                elif op == "mkdir":
                    await a.mkdir(parent, name, 0o755, 0, 0)
                    model[path] = ("d",)
                else:
                    await a.symlink(parent, name, b"target-" + name, 0, 0)
                    model[path] = ("l", b"target-" + name)
                continue
            path = data.draw(st.sampled_from(fs))
            parent, name = await walk_to(a, path)
            ino = (await a.lookup(parent, name)).ino
            old = model[path][1]
            if op == "write":
                off = data.draw(st.integers(0, len(old) + 3))
                piece = data.draw(st.sampled_from([b"xy", b"Q" * 9000]))
                await a.write(ino, off, piece)
                new = bytearray(old.ljust(off, b"\0"))
                new[off:off + len(piece)] = piece
                model[path] = ("f", bytes(new))
            elif op == "truncate":
                size = data.draw(st.integers(0, len(old) + 5))
                await a.setattr(ino, size=size)
                model[path] = ("f", old[:size].ljust(size, b"\0"))
            elif op == "unlink":
                await a.unlink(parent, name)
                del model[path]
            else:
                dest = data.draw(st.sampled_from(dirs())) + b"/" + data.draw(
                    st.sampled_from(NAMES))
                if dest in model and model[dest][0] != "f":
                    continue
                dparent, dname = await walk_to(a, dest)
                await a.rename(parent, name, dparent, dname)
                model[dest] = model.pop(path)
        await a.sync()
        tt = TimeTravel(a)
        p = await latest_after_sync(tt)
        assert await live_tree(a) == model
        seen.append((p.cover, dict(model)))
    for a in ns:
        await a.refresh()
    tts = [TimeTravel(a) for a in ns]
    for tt in tts:
        await tt.refresh()
    assert len({tuple(describe_points(tt.history)) for tt in tts}) == 1
    tt = tts[0]
    for cover, m in seen:
        p = tt.history.at_cover(cover)
        assert p is not None and await version_tree(tt, p) == m


@settings(max_examples=int(os.environ.get("HIST_EXAMPLES", 25)))
@given(st.data())
def test_concurrent_histories_settled_versions_never_change(data):
    trio.run(_concurrent_history, data)


async def _concurrent_history(data):
    net = Net(2)
    ns = [await net.mount(0), await net.mount(1)]
    tts = [TimeTravel(a) for a in ns]
    final = {}                                  # name -> (cover, tree) of settled versions
    for _ in range(data.draw(st.integers(1, 8), label="steps")):
        w = data.draw(st.integers(0, 1), label="who")
        a = ns[w]
        step = data.draw(st.sampled_from(["op", "op", "op", "sync", "refresh"]))
        if step == "sync":
            await a.sync()
            continue
        if step == "refresh":
            await a.refresh()
            tt = tts[w]
            await tt.refresh()
            for p in tt.history.versions():
                if tt.history.is_settled(p) and p.name not in final:
                    final[p.name] = (p.cover, await version_tree(tt, p))
            continue
        entries = await a.readdir(ROOT_INO)
        files = [(n, x.ino) for n, x in entries if not x.is_dir]
        op = data.draw(st.sampled_from(["create", "write", "unlink", "rename"]))
        if op != "create" and not files:
            op = "create"
        if op == "create":
            name = data.draw(st.sampled_from(NAMES))
            if name not in {n for n, _ in entries}:
                f = await a.create(ROOT_INO, name, 0o644, 0, 0)
                await a.write(f.ino, 0, b"by %d" % w)
        else:
            name, ino = data.draw(st.sampled_from(files))
            if op == "write":
                await a.write(ino, data.draw(st.integers(0, 4)), b"w%d" % w)
            elif op == "unlink":
                await a.unlink(ROOT_INO, name)
            else:
                await a.rename(ROOT_INO, name, ROOT_INO, data.draw(st.sampled_from(NAMES)))
    for _ in range(2):
        for a in ns:
            await a.sync()
            await a.refresh()
    for tt in tts:
        await tt.refresh()
    assert describe_points(tts[0].history) == describe_points(tts[1].history)
    live = await live_tree(ns[0])
    assert live == await live_tree(ns[1])
    assert await version_tree(tts[0], tts[0].history.latest()) == live
    for name, (cover, tree) in final.items():
        p = tts[0].history.version(name)
        assert p is not None and p.cover == cover
        assert await version_tree(tts[1], p) == tree
