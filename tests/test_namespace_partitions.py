"""Three writers doing random, conflicting operations anywhere in one tree,
through random partitions and heals (Ivy's partition mode): once everyone is
connected again and has synced and refreshed, every writer computes the same
state, and a fresh mount computes it too, from the logs alone and from a
snapshot. Also checks the tree invariants of every writer after every step."""

import os
import random

import trio
from hypothesis import given, settings, strategies as st

from overlay.wire.ids import Identity
from storage.fs_errors import FsError
from storage.localblocks import MemoryBlockAccess
from storage.logs import MemoryHeadBoard
from storage.namespace import Namespace
from storage.volume import create_volume

ROOT = 1
NAMES = [b"a", b"b", b"c"]
EXAMPLES = int(os.environ.get("PART_EXAMPLES", 8))


class World:
    """Writers with their own stores; stores of connected writers are merged
    after every step, as a network inside each partition would."""

    def __init__(self, n=3):
        self.ids = [Identity.from_seed(b"partition %d" % i) for i in range(n)]
        self.view, self.key = create_volume(self.ids[0], "p")
        for ident in self.ids[1:]:
            self.view = self.view.add_writer(self.ids[0], self.key, ident.public_key)
        self.stores = [(MemoryBlockAccess(self.key), MemoryHeadBoard()) for _ in range(n)]
        self.groups = [0] * n
        self.ns = []

    async def start(self):
        for i, ident in enumerate(self.ids):
            self.ns.append(await Namespace.mount(self.view, ident, *self.stores[i]))
            self.gossip()

    def gossip(self):
        for g in set(self.groups):
            members = [i for i, x in enumerate(self.groups) if x == g]
            for i in members:
                for j in members:
                    if i != j:
                        self.stores[i][0].absorb(self.stores[j][0])
                        self.stores[i][1].absorb(self.stores[j][1])

    async def step(self, rnd: random.Random):
        i = rnd.randrange(len(self.ns))
        ns = self.ns[i]
        k = rnd.random()
        if k < 0.08:
            self.groups = [rnd.randrange(2) for _ in self.ns]      # a new partition
        elif k < 0.12:
            self.groups = [0] * len(self.ns)                        # heal
        elif k < 0.25:
            await ns.sync()
        elif k < 0.38:
            await ns.refresh()
        else:
            try:
                await random_op(ns, rnd)
            except FsError:
                pass
        self.gossip()
        ns._st.check()

    async def settle_all(self):
        self.groups = [0] * len(self.ns)
        for _ in range(2):
            for ns in self.ns:
                await ns.sync()
                self.gossip()
            for ns in self.ns:
                await ns.refresh()
                self.gossip()


async def random_op(ns, rnd):
    st_ = ns._st
    dirs = sorted(i for i, n in st_.inodes.items() if n.is_dir)
    files = sorted(i for i, n in st_.inodes.items() if n.data is not None and n.links)
    entries = sorted((d, nm) for d in dirs for nm in st_.inodes[d].entries)
    k = rnd.randrange(9)
    if k <= 1 or not entries:
        d = rnd.choice(dirs)
        if rnd.random() < 0.5:
            await ns.create(d, rnd.choice(NAMES), 0o644, 0, 0)
        else:
            await ns.mkdir(d, rnd.choice(NAMES), 0o755, 0, 0)
    elif k == 2 and files:
        data = bytes([rnd.randrange(256)]) * rnd.choice([3, 100, 9000, 70000])
        await ns.write(rnd.choice(files), rnd.choice([0, 5, 65536]), data)
    elif k == 3 and files:
        await ns.setattr(rnd.choice(files), size=rnd.choice([0, 4, 70000]))
    elif k == 4:
        d, nm = rnd.choice(entries)
        if st_.inodes[st_.inodes[d].entries[nm].ino].is_dir:
            await ns.rmdir(d, nm)
        else:
            await ns.unlink(d, nm)
    elif k == 5:
        d, nm = rnd.choice(entries)
        await ns.rename(d, nm, rnd.choice(dirs), rnd.choice(NAMES))
    elif k == 6 and files:
        await ns.link(rnd.choice(files), rnd.choice(dirs), rnd.choice(NAMES))
    elif k == 7:
        await ns.setxattr(rnd.choice(dirs + files), b"user.k", bytes([rnd.randrange(9)]))
    elif files:
        await ns.setattr(rnd.choice(files), mode=rnd.choice([0o600, 0o644]))


async def tree(ns, ino=ROOT, prefix=b""):
    out = {}
    for name, a in await ns.readdir(ino):
        p = prefix + b"/" + name
        body = await ns.read(a.ino, 0, a.size) if a.mode & 0o170000 == 0o100000 else None
        out[p] = (a.ino, a.mode, a.nlink, a.size, body, tuple(await ns.listxattr(a.ino)))
        if a.is_dir:
            out.update(await tree(ns, a.ino, p))
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, 2**32), st.integers(20, 60))
def test_partitions_heal_to_one_state(seed, steps):
    async def main():
        rnd = random.Random(seed)
        w = World()
        await w.start()
        for _ in range(steps):
            await w.step(rnd)
        await w.settle_all()
        trees = [await tree(ns) for ns in w.ns]
        assert trees[0] == trees[1] == trees[2]
        canon = [ns._st.canonical() for ns in w.ns]
        assert canon[0] == canon[1] == canon[2]
        blocks, board = w.stores[0]
        fresh = await Namespace.mount(w.view, Identity.from_seed(b"reader"), blocks, board,
                                      use_snapshots=False)
        assert await tree(fresh) == trees[0]
        root = await w.ns[0].snapshot()
        if root is not None:
            w.gossip()
            snap = await Namespace.mount(w.view, Identity.from_seed(b"reader"), blocks, board)
            assert snap.snapshot_used is not None
            assert await tree(snap) == trees[0]
            assert snap.conflicts() == w.ns[0].conflicts()
    trio.run(main)
