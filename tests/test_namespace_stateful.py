"""Random sequences of namespace operations from 1 and from 3 writers,
checked against a simple in-memory model of a POSIX tree (hypothesis
stateful testing): every operation must succeed or fail exactly as the
model says (same errno), a writer must read its own writes at once, and
at every sync point (all writers sync, then all refresh) every writer's
whole tree, file contents included, must equal the model's.

With 3 writers each works in its own top-level directory, so their
operations never conflict, but their records interleave in the total order
and arrive out of order at each other (rollback and replay on refresh)."""

import errno
import os

import trio
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from overlay.wire.ids import Identity
from storage.fs_errors import FsError
from storage.localblocks import MemoryBlockAccess
from storage.logs import MemoryHeadBoard
from storage.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, Namespace
from storage.volume import create_volume

ROOT = 1
NAMES = [b"a", b"b", b"c", b"d"]
EXAMPLES = int(os.environ.get("NS_EXAMPLES", 20))


class Node:
    def __init__(self, kind, mode, target=None):
        self.kind = kind            # "f", "d", "l"
        self.mode = mode
        self.data = bytearray()
        self.target = target
        self.xattrs = {}
        self.children = {}          # dirs: name -> ino
        self.parent = None          # dirs
        self.nlink = 0


class Model:
    """A POSIX tree with Linux's error rules, keyed by the real inode numbers."""

    def __init__(self):
        self.nodes = {ROOT: Node("d", 0o755)}

    def dir(self, ino):
        n = self.nodes.get(ino)
        if n is None:
            return errno.ENOENT, None
        if n.kind != "d":
            return errno.ENOTDIR, None
        return None, n

    def ancestor(self, a, ino):
        while True:
            if ino == a:
                return True
            if ino == ROOT:
                return False
            ino = self.nodes[ino].parent

    def check_new(self, parent, name):
        e, d = self.dir(parent)
        if e:
            return e
        if name in d.children:
            return errno.EEXIST
        return None

    def add(self, parent, name, ino, node):
        self.nodes[ino] = node
        self.link(parent, name, ino)

    def link(self, parent, name, ino):
        d, n = self.nodes[parent], self.nodes[ino]
        d.children[name] = ino
        n.nlink += 1
        if n.kind == "d":
            n.parent = parent

    def drop(self, parent, name):
        d = self.nodes[parent]
        ino = d.children.pop(name)
        n = self.nodes[ino]
        n.nlink -= 1
        if n.nlink == 0:
            del self.nodes[ino]

    def unlink_err(self, parent, name, want_dir):
        e, d = self.dir(parent)
        if e:
            return e
        if name not in d.children:
            return errno.ENOENT
        n = self.nodes[d.children[name]]
        if want_dir:
            if n.kind != "d":
                return errno.ENOTDIR
            if n.children:
                return errno.ENOTEMPTY
        elif n.kind == "d":
            return errno.EISDIR
        return None

    def rename_err(self, p1, n1, p2, n2, flags):
        for p in (p1, p2):
            e, _ = self.dir(p)
            if e:
                return e
        src = self.nodes[p1].children.get(n1)
        if src is None:
            return errno.ENOENT
        dst = self.nodes[p2].children.get(n2)
        if flags & RENAME_EXCHANGE and dst is None:
            return errno.ENOENT
        if flags & RENAME_NOREPLACE and dst is not None:
            return errno.EEXIST
        s = self.nodes[src]
        if s.kind == "d" and self.ancestor(src, p2):
            return errno.EINVAL
        if dst is not None and self.nodes[dst].kind == "d" and self.ancestor(dst, p1):
            return errno.EINVAL if flags & RENAME_EXCHANGE else errno.ENOTEMPTY
        if dst is None or dst == src or flags & RENAME_EXCHANGE:
            return None
        t = self.nodes[dst]
        if s.kind == "d":
            if t.kind != "d":
                return errno.ENOTDIR
            if t.children:
                return errno.ENOTEMPTY
        elif t.kind == "d":
            return errno.EISDIR
        return None

    def rename(self, p1, n1, p2, n2, flags):
        src = self.nodes[p1].children[n1]
        dst = self.nodes[p2].children.get(n2)
        if flags & RENAME_EXCHANGE:
            if src == dst:
                return
            self.nodes[p1].children[n1] = dst
            self.nodes[p2].children[n2] = src
            for ino, p in ((dst, p1), (src, p2)):
                if self.nodes[ino].kind == "d":
                    self.nodes[ino].parent = p
            return
        if dst == src:
            return
        if dst is not None:
            self.drop(p2, n2)
        del self.nodes[p1].children[n1]
        self.nodes[src].nlink -= 1
        self.link(p2, n2, src)

    def paths(self, top=ROOT, prefix=b""):
        out = {}
        for name, ino in self.nodes[top].children.items():
            p = prefix + b"/" + name
            n = self.nodes[ino]
            out[p] = ino
            if n.kind == "d":
                out.update(self.paths(ino, p))
        return out

    def view(self):
        v = {}
        for p, ino in self.paths().items():
            n = self.nodes[ino]
            body = bytes(n.data) if n.kind == "f" else n.target
            v[p] = (ino, n.kind, n.mode, body, tuple(sorted(n.xattrs.items())),
                    n.nlink if n.kind != "d" else None)
        return v


async def real_view(ns, ino=ROOT, prefix=b""):
    v = {}
    for name, a in await ns.readdir(ino):
        p = prefix + b"/" + name
        kind = "d" if a.mode & 0o170000 == 0o040000 else (
            "l" if a.mode & 0o170000 == 0o120000 else "f")
        body = None
        if kind == "f":
            body = await ns.read(a.ino, 0, a.size + 1)
            assert len(body) == a.size
        elif kind == "l":
            body = await ns.readlink(a.ino)
        xs = tuple(sorted([(k, await ns.getxattr(a.ino, k)) for k in await ns.listxattr(a.ino)]))
        v[p] = (a.ino, kind, a.mode & 0o7777, body, xs, a.nlink if kind != "d" else None)
        if kind == "d":
            v.update(await real_view(ns, a.ino, p))
    return v


async def shape(ns, ino, prefix=b""):
    out = {}
    for name, a in await ns.readdir(ino):
        p = prefix + b"/" + name
        out[p] = (a.ino, a.size if a.mode & 0o170000 == 0o100000 else 0)
        if a.is_dir:
            out.update(await shape(ns, a.ino, p))
    return out


def run(fn, *args, **kw):
    """Run one namespace call; return (errno or None, result)."""
    async def go():
        try:
            return None, await fn(*args, **kw)
        except FsError as e:
            return e.errno, None
    return trio.run(go)


class NamespaceMachine(RuleBasedStateMachine):
    WRITERS = 1

    @initialize()
    def setup(self):
        ids = [Identity.from_seed(b"stateful %d" % i) for i in range(self.WRITERS)]
        view, key = create_volume(ids[0], "stateful")
        for ident in ids[1:]:
            view = view.add_writer(ids[0], key, ident.public_key)
        blocks, board = MemoryBlockAccess(key), MemoryHeadBoard()

        async def mount_all():
            return [await Namespace.mount(view, i, blocks, board) for i in ids]
        self.ns = trio.run(mount_all)
        self.model = Model()
        self.tops = []
        if self.WRITERS == 1:
            self.tops = [ROOT]
        else:
            for w in range(self.WRITERS):
                e, a = run(self.ns[0].mkdir, ROOT, b"w%d" % w, 0o755, 0, 0)
                assert e is None
                self.model.add(ROOT, b"w%d" % w, a.ino, Node("d", 0o755))
                self.tops.append(a.ino)
            self.sync_point()

    # -- choosing operands ----------------------------------------------

    def inodes_of(self, w, kinds):
        top = self.tops[w]
        paths = self.model.paths(top)
        out = sorted({ino for ino in paths.values() if self.model.nodes[ino].kind in kinds})
        if "d" in kinds:
            out = [top] + out
        return out

    def pick(self, data, w, kinds):
        opts = self.inodes_of(w, kinds)
        return data.draw(st.sampled_from(opts)) if opts else None

    def expect(self, got, want, what):
        assert got == want, (f"{what}: namespace gave {errno.errorcode.get(got, got)}, "
                             f"model expects {errno.errorcode.get(want, want)}")

    # -- rules -------------------------------------------------------------

    @rule(data=st.data(), name=st.sampled_from(NAMES), kind=st.sampled_from("fdl"))
    def make(self, data, name, kind):
        w = data.draw(st.integers(0, self.WRITERS - 1))
        ns, parent = self.ns[w], self.pick(data, w, "d")
        want = self.model.check_new(parent, name)
        mode = data.draw(st.sampled_from([0o644, 0o600, 0o755]))
        if kind == "f":
            e, a = run(ns.create, parent, name, mode, 0, 0)
        elif kind == "d":
            e, a = run(ns.mkdir, parent, name, mode, 0, 0)
        else:
            e, a = run(ns.symlink, parent, name, b"target-" + name, 0, 0)
            mode = 0o777
        self.expect(e, want, f"make {kind} {name}")
        if e is None:
            self.model.add(parent, name, a.ino, Node(kind, mode, b"target-" + name
                                                     if kind == "l" else None))

    @rule(data=st.data(), off=st.sampled_from([0, 1, 100, 4095, 65530, 70000, 131072]),
          size=st.sampled_from([1, 10, 3000, 9000, 70000, 140000]), byte=st.integers(0, 255))
    def write(self, data, off, size, byte):
        w = data.draw(st.integers(0, self.WRITERS - 1))
        f = self.pick(data, w, "f")
        if f is None:
            return
        payload = bytes([byte]) * size
        e, n = run(self.ns[w].write, f, off, payload)
        self.expect(e, None, "write")
        d = self.model.nodes[f].data
        if len(d) < off + size:
            d.extend(bytes(off + size - len(d)))
        d[off:off + size] = payload
        # read-your-writes, at once
        lo = max(0, off - 5)
        e, got = run(self.ns[w].read, f, lo, off + size + 5 - lo)
        assert got == bytes(d[lo:off + size + 5])

    @rule(data=st.data(), size=st.sampled_from([0, 5, 5000, 66000]))
    def truncate(self, data, size):
        w = data.draw(st.integers(0, self.WRITERS - 1))
        ino = self.pick(data, w, "fd")
        n = self.model.nodes[ino]
        e, _ = run(self.ns[w].setattr, ino, size=size)
        self.expect(e, errno.EISDIR if n.kind == "d" else None, "truncate")
        if e is None:
            if len(n.data) < size:
                n.data.extend(bytes(size - len(n.data)))
            del n.data[size:]

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o755, 0o4711]),
          key=st.sampled_from([b"user.x", b"user.y"]), value=st.binary(max_size=8))
    def attrs(self, data, mode, key, value):
        w = data.draw(st.integers(0, self.WRITERS - 1))
        ino = self.pick(data, w, "fd")
        n = self.model.nodes[ino]
        if data.draw(st.booleans()):
            e, _ = run(self.ns[w].setattr, ino, mode=mode)
            self.expect(e, None, "chmod")
            n.mode = mode
        elif key in n.xattrs and data.draw(st.booleans()):
            e, _ = run(self.ns[w].removexattr, ino, key)
            self.expect(e, None, "removexattr")
            del n.xattrs[key]
        else:
            e, _ = run(self.ns[w].setxattr, ino, key, value)
            self.expect(e, None, "setxattr")
            n.xattrs[key] = value

    @rule(data=st.data(), name=st.sampled_from(NAMES), rmdir=st.booleans())
    def remove(self, data, name, rmdir):
        w = data.draw(st.integers(0, self.WRITERS - 1))
        parent = self.pick(data, w, "d")
        want = self.model.unlink_err(parent, name, rmdir)
        e, _ = run(self.ns[w].rmdir if rmdir else self.ns[w].unlink, parent, name)
        self.expect(e, want, f"{'rmdir' if rmdir else 'unlink'} {name}")
        if e is None:
            self.model.drop(parent, name)

    @rule(data=st.data(), n1=st.sampled_from(NAMES), n2=st.sampled_from(NAMES),
          flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data, n1, n2, flags):
        w = data.draw(st.integers(0, self.WRITERS - 1))
        p1, p2 = self.pick(data, w, "d"), self.pick(data, w, "d")
        want = self.model.rename_err(p1, n1, p2, n2, flags)
        e, _ = run(self.ns[w].rename, p1, n1, p2, n2, flags)
        self.expect(e, want, f"rename {n1}->{n2} flags {flags}")
        if e is None:
            self.model.rename(p1, n1, p2, n2, flags)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def hard_link(self, data, name):
        w = data.draw(st.integers(0, self.WRITERS - 1))
        f = self.pick(data, w, "fl")
        if f is None:
            return
        parent = self.pick(data, w, "d")
        want = self.model.check_new(parent, name)
        e, _ = run(self.ns[w].link, f, parent, name)
        self.expect(e, want, f"link {name}")
        if e is None:
            self.model.link(parent, name, f)

    @rule()
    def sync_point(self):
        async def sync_all():
            for ns in self.ns:
                await ns.sync()
            for ns in self.ns:
                await ns.refresh()
        trio.run(sync_all)
        want = self.model.view()
        views = [trio.run(real_view, ns) for ns in self.ns]
        for v in views:
            assert v == want
        canon = [ns._st.canonical()[:2] for ns in self.ns]
        assert all(c == canon[0] for c in canon)
        for ns in self.ns:
            assert not ns.problems and not ns.conflicts()
            ns._st.check()

    @invariant()
    def own_tree_matches(self):
        """Between sync points, each writer sees its own subtree as the
        model does (names, inodes, types, sizes; contents at sync points)."""
        if not hasattr(self, "ns"):
            return
        for w, ns in enumerate(self.ns):
            top = self.tops[w]
            want = {p: (ino, len(self.model.nodes[ino].data))
                    for p, ino in self.model.paths(top).items()}
            assert trio.run(shape, ns, top) == want


class ThreeWriters(NamespaceMachine):
    WRITERS = 3


TestOneWriter = NamespaceMachine.TestCase
TestOneWriter.settings = settings(max_examples=EXAMPLES, stateful_step_count=25, deadline=None)
TestThreeWriters = ThreeWriters.TestCase
TestThreeWriters.settings = settings(max_examples=EXAMPLES, stateful_step_count=25,
                                     deadline=None)
