"""A byte sequence as a copy-on-write tree of blocks (OceanStore/Pond data
layout, DESIGN.md "storage/objects"; reused by Ivy's snapshots in ``logs``).

Shape. Bytes ``[i*B, (i+1)*B)`` live in *leaf* ``i`` (a DATA block of at
most ``B = block_size`` bytes). An INDIRECT block is the concatenation of
up to ``F = fanout`` 32-byte BGUIDs of its children; a tree of depth ``d``
has an INDIRECT root at level ``d`` and leaves at level 0, so it covers
``B * F**d`` bytes. With the defaults (B = 64 KiB, F = 64 KiB / 32 = 2048,
so an INDIRECT block is exactly ``MAX_BLOCK``):

=====  ==========  =========================================
depth  covers      example
=====  ==========  =========================================
0      64 KiB      one DATA block is the root
1      128 MiB     a 100 MiB object: 1 INDIRECT + 1,600 DATA
2      256 GiB
3      512 TiB     a 1 TiB object
=====  ==========  =========================================

A :class:`TreeRef` names a tree: its size, depth, root BGUID and the two
shape parameters; tiny contents (at most ``inline_max`` bytes) are kept
inline in the ref itself, so a small object costs no block but its root.

Invariants every writer here keeps, and readers rely on:

* **Holes.** A missing child (the all-zero BGUID in an INDIRECT block, or
  ``root = None``) reads as zeros and costs no block; a leaf or subtree that
  would be all zeros is never stored. A DATA block shorter than ``B`` is
  zero-padded (trailing zeros are stripped before storing), and an
  INDIRECT block never ends with a hole (trailing holes are trimmed).
* **Nothing past the end.** No leaf holds bytes at or past ``size``, and no
  subtree lies wholly past it, so extending (by truncate or by a write past
  the end) exposes zeros without touching old blocks.
* **Minimal depth.** ``depth`` is the least that covers ``size``: truncating
  to a smaller size collapses the top levels; growing adds levels on top.
* **Copy-on-write.** A write rewrites exactly the leaves it touches and
  their ancestors; every other subtree is shared with the old tree by BGUID.
  Writing 4 KiB into a 100 MiB tree stores 2 blocks (depth + 1).

I/O. Each level of a write is one ``put_many`` (leaves first, then the
INDIRECT blocks of each level above, since a parent names its children's
BGUIDs); each level of a read is one ``get_many``. Decoded INDIRECT blocks are
cached by BGUID (they are immutable, so the cache never needs invalidation).
:class:`TreeReader` adds read-ahead for sequential reads.

Since sealing is convergent and includes the block's kind, a BGUID fixes a
block's whole subtree (and its height), which is what makes :meth:`diff`
exact when it compares trees level by level.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import AsyncIterator

from overlay.wire import frames

from .blockapi import MAX_BLOCK, BlockAccess, Kind
from .errors import StorageError

HASH = 32
DEFAULT_FANOUT = MAX_BLOCK // HASH        # 2048: an INDIRECT block fills MAX_BLOCK
INLINE_LIMIT = 4096                       # most bytes any TreeRef may carry inline
DEFAULT_INLINE = 1024                     # what a BlockTree keeps inline by default
MAX_SIZE = 2**63 - 1
MAX_DEPTH = 64
_HOLE = bytes(HASH)
_PENDING = object()  # a child about to be replaced during a write (never stored)


class BadTree(StorageError):
    """A tree reference or one of its blocks is malformed: a TreeRef whose
    fields disagree (inline bytes of the wrong length, a depth that is not
    the least covering its size), an INDIRECT block that is not a whole
    number of BGUIDs, has more than ``fanout`` of them or ends in a hole, or
    a DATA block longer than the block size. The blocks verified against
    their BGUIDs, so this is the fault of whoever wrote the tree."""


def depth_for(size: int, block_size: int, fanout: int) -> int:
    """The least depth whose tree covers ``size`` bytes."""
    depth, cap = 0, block_size
    while cap < size:
        cap *= fanout
        depth += 1
    return depth


_REF_SCHEMA = frames.spec({
    "s": frames.Int(0, MAX_SIZE), "d": frames.Int(0, MAX_DEPTH),
    "b": frames.Int(1, MAX_BLOCK), "f": frames.Int(2, DEFAULT_FANOUT),
    "r": frames.Optional(frames.Nullable(frames.GUID)),
    "i": frames.Optional(frames.Bytes(max=INLINE_LIMIT)),
})


@dataclass(frozen=True, slots=True)
class TreeRef:
    """The name of one tree: small enough to sit in a root block or a log
    record. Exactly one of ``root`` (possibly None: all holes) and ``inline``
    describes the content."""

    size: int
    depth: int
    root: bytes | None
    inline: bytes | None
    block_size: int = MAX_BLOCK
    fanout: int = DEFAULT_FANOUT

    def to_dict(self) -> dict:
        d = {"s": self.size, "d": self.depth, "b": self.block_size, "f": self.fanout}
        if self.inline is not None:
            d["i"] = self.inline
        else:
            d["r"] = self.root
        return d

    @classmethod
    def from_dict(cls, d: object) -> "TreeRef":
        """Check and build a ref from its decoded form; raises :class:`BadTree`."""
        try:
            _REF_SCHEMA.check(d, "tree")
        except frames.FrameError as e:
            raise BadTree(str(e)) from None
        if ("i" in d) == ("r" in d):
            raise BadTree("tree: exactly one of root 'r' and inline 'i' must be present")
        ref = cls(d["s"], d["d"], d.get("r"), d.get("i"), d["b"], d["f"])
        ref.check()
        return ref

    def check(self) -> None:
        """The structural invariants of a ref (module docstring)."""
        if not (1 <= self.block_size <= MAX_BLOCK and 2 <= self.fanout <= DEFAULT_FANOUT):
            raise BadTree(f"tree: block size {self.block_size} / fanout {self.fanout} out of range")
        if not 0 <= self.size <= MAX_SIZE:
            raise BadTree(f"tree: size {self.size} out of range")
        if self.inline is not None:
            if self.root is not None or self.depth != 0 or len(self.inline) != self.size:
                raise BadTree("tree: inline content must be the whole object at depth 0")
            if self.size > INLINE_LIMIT:
                raise BadTree(f"tree: {self.size} inline bytes exceed {INLINE_LIMIT}")
            return
        if self.depth != depth_for(self.size, self.block_size, self.fanout):
            raise BadTree(f"tree: depth {self.depth} is not the least covering {self.size} bytes")
        if self.root is not None and len(self.root) != HASH:
            raise BadTree("tree: root is not a 32-byte BGUID")


@dataclass(frozen=True, slots=True)
class TreeDiff:
    """Blocks (BGUID, kind) reachable from one tree but not from the other."""

    added: frozenset      # in the new tree only: what a new version stored
    removed: frozenset    # in the old tree only: garbage once the old one goes


def encode_node(children) -> bytes | None:
    """An INDIRECT block's bytes, trailing holes trimmed; None if all holes."""
    n = len(children)
    while n and children[n - 1] is None:
        n -= 1
    if n == 0:
        return None
    return b"".join(_HOLE if c is None else c for c in children[:n])


def decode_node(raw: bytes, fanout: int, bguid: bytes = b"") -> tuple:
    """The children (BGUID or None) of an INDIRECT block; raises BadTree."""
    n, rest = divmod(len(raw), HASH)
    if rest or n == 0 or n > fanout:
        raise BadTree(f"INDIRECT block {bguid[:4].hex()}: {len(raw)} bytes is not "
                      f"1..{fanout} BGUIDs")
    kids = tuple(None if (c := raw[i:i + HASH]) == _HOLE else c
                 for i in range(0, len(raw), HASH))
    if kids[-1] is None:
        raise BadTree(f"INDIRECT block {bguid[:4].hex()} ends in a hole")
    return kids


class BlockTree:
    """Reads and copy-on-write updates of trees over one :class:`BlockAccess`.

    ``block_size``, ``fanout`` shape *new* trees (small values exercise deep
    trees in tests); an existing ref is always handled with its own shape.
    ``leaf_kind`` is the Kind of leaves (DATA for file bytes; a user such as
    a snapshot's inode table may choose another)."""

    def __init__(self, access: BlockAccess, *, block_size: int = MAX_BLOCK,
                 fanout: int = DEFAULT_FANOUT, inline_max: int = DEFAULT_INLINE,
                 leaf_kind: Kind = Kind.DATA, cache_nodes: int = 256):
        if not 1 <= block_size <= MAX_BLOCK or not 2 <= fanout <= DEFAULT_FANOUT:
            raise ValueError("block_size must be 1..MAX_BLOCK and fanout 2..MAX_BLOCK/32")
        if not 0 <= inline_max <= INLINE_LIMIT:
            raise ValueError(f"inline_max must be 0..{INLINE_LIMIT}")
        self.access = access
        self.block_size = block_size
        self.fanout = fanout
        self.inline_max = inline_max
        self.leaf_kind = leaf_kind
        self._nodes: OrderedDict[bytes, tuple] = OrderedDict()
        self._cache_nodes = cache_nodes

    def empty(self) -> TreeRef:
        """A tree of size 0 with this instance's shape."""
        return TreeRef(0, 0, None, b"", self.block_size, self.fanout)

    # -- block I/O ---------------------------------------------------------------

    async def _load_nodes(self, ptrs, fanout: int) -> dict[bytes, tuple]:
        """Decoded INDIRECT blocks by BGUID, fetched in one batch if not cached."""
        out, missing = {}, []
        for p in dict.fromkeys(ptrs):
            kids = self._nodes.get(p)
            if kids is None:
                missing.append(p)
            else:
                self._nodes.move_to_end(p)
                out[p] = kids
        if missing:
            raws = await self.access.get_many([(p, Kind.INDIRECT) for p in missing])
            for p, raw in zip(missing, raws):
                out[p] = self._remember(p, decode_node(raw, DEFAULT_FANOUT, p))
        for p, kids in out.items():
            if len(kids) > fanout:
                raise BadTree(f"INDIRECT block {p[:4].hex()} has {len(kids)} children, "
                              f"fanout is {fanout}")
        return out

    def _remember(self, p: bytes, kids: tuple) -> tuple:
        self._nodes[p] = kids
        while len(self._nodes) > self._cache_nodes:
            self._nodes.popitem(last=False)
        return kids

    async def _put_nodes(self, nodes: list[tuple]) -> list[bytes]:
        if not nodes:
            return []
        bguids = await self.access.put_many([(Kind.INDIRECT, encode_node(k)) for k in nodes])
        for g, kids in zip(bguids, nodes):
            self._remember(g, kids)
        return bguids

    async def _pointers(self, ref: TreeRef, lo: int, hi: int) -> dict[int, bytes]:
        """BGUIDs of leaves ``lo..hi`` that are not holes, one batch per level."""
        fan = ref.fanout
        cur = {0: ref.root} if ref.root is not None else {}
        for level in range(ref.depth, 0, -1):
            nodes = await self._load_nodes(cur.values(), fan)
            span = fan ** (level - 1)
            clo, chi = lo // span, hi // span
            nxt = {}
            for idx, p in cur.items():
                kids, base = nodes[p], idx * fan
                for c in range(max(clo, base), min(chi, base + len(kids) - 1) + 1):
                    if kids[c - base] is not None:
                        nxt[c] = kids[c - base]
            cur = nxt
        return cur

    async def _leaves(self, ref: TreeRef, lo: int, hi: int, skip=()) -> dict[int, bytes]:
        """Contents of the non-hole leaves ``lo..hi`` (those not in ``skip``)."""
        ptrs = {i: p for i, p in (await self._pointers(ref, lo, hi)).items() if i not in skip}
        idx = list(ptrs)
        if not idx:
            return {}
        raws = await self.access.get_many([(ptrs[i], self.leaf_kind) for i in idx])
        for i, raw in zip(idx, raws):
            if len(raw) > ref.block_size:
                raise BadTree(f"DATA block {ptrs[i][:4].hex()} of {len(raw)} bytes exceeds "
                              f"block size {ref.block_size}")
        return dict(zip(idx, raws))

    # -- reading -----------------------------------------------------------------

    async def read(self, ref: TreeRef, off: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``off`` (fewer at the end; holes are zeros)."""
        end = _clamp(ref, off, n)
        if end <= off:
            return b""
        if ref.inline is not None:
            return ref.inline[off:end]
        bs = ref.block_size
        leaves = await self._leaves(ref, off // bs, (end - 1) // bs)
        return _assemble(bs, off, end, leaves)

    def reader(self, ref: TreeRef, *, max_ahead: int = 32) -> "TreeReader":
        return TreeReader(self, ref, max_ahead=max_ahead)

    # -- writing -----------------------------------------------------------------

    async def write(self, ref: TreeRef, off: int, data) -> TreeRef:
        """The tree with ``data`` written at ``off`` (extending it if needed)."""
        ref.check()
        data = memoryview(data).cast("B")
        n = len(data)
        if off < 0:
            raise ValueError("negative offset")
        if n == 0:
            return ref
        if off + n > MAX_SIZE:
            raise ValueError(f"a tree holds at most {MAX_SIZE} bytes")
        new_size = max(ref.size, off + n)
        if ref.inline is not None:
            if new_size <= self.inline_max:
                buf = bytearray(ref.inline)
                buf.extend(bytes(new_size - len(buf)))
                buf[off:off + n] = data
                return replace(ref, size=new_size, inline=bytes(buf))
            # Spill to blocks. A write near the inline bytes is merged with
            # them (one store per leaf); a far one cannot share their leaves.
            base = TreeRef(0, 0, None, None, ref.block_size, ref.fanout)
            if off - ref.size <= ref.block_size:
                buf = bytearray(ref.inline)
                buf.extend(bytes(new_size - len(buf)))
                buf[off:off + n] = data
                return await self._write_blocks(base, 0, memoryview(buf))
            ref = await self._write_blocks(base, 0, memoryview(ref.inline))
        return await self._write_blocks(ref, off, data)

    async def _write_blocks(self, ref: TreeRef, off: int, data: memoryview) -> TreeRef:
        bs, fan, old_depth, old_size = ref.block_size, ref.fanout, ref.depth, ref.size
        end = off + len(data)
        if not data:
            return ref
        new_size = max(old_size, end)
        depth = depth_for(new_size, bs, fan)
        first, last = off // bs, (end - 1) // bs
        a = [first // fan ** lv for lv in range(depth + 1)]   # first touched node per level
        b = [last // fan ** lv for lv in range(depth + 1)]    # last touched node per level
        old: dict[tuple[int, int], tuple] = {}                # (level, idx) -> old children

        if depth > old_depth and ref.root is not None:
            # Grow on top. Node 0 of each new level wraps node 0 below; wrappers
            # the write does not pass through are stored as they are, the
            # others are described in memory and rebuilt below.
            ptr, lv = ref.root, old_depth + 1
            while lv < depth and a[lv] != 0:
                ptr = (await self._put_nodes([(ptr,)]))[0]
                lv += 1
            old[(lv, 0)] = (ptr,)
            for above in range(lv + 1, depth + 1):
                old[(above, 0)] = (_PENDING,)

        def old_ptr(lv: int, idx: int):
            if lv == depth:
                return ref.root  # only asked when the depth did not change
            parent = old.get((lv + 1, idx // fan))
            j = idx % fan
            return parent[j] if parent and j < len(parent) else None

        # Top-down: only the first and last touched node of each level can be
        # partly covered; nodes between them are rebuilt from new children only.
        for lv in range(min(old_depth, depth), 0, -1):
            want = {i: p for i in {a[lv], b[lv]} if (p := old_ptr(lv, i)) is not None}
            nodes = await self._load_nodes(want.values(), fan)
            for i, p in want.items():
                old[(lv, i)] = nodes[p]

        def covered(i: int) -> bool:  # leaf i keeps none of its old bytes
            s = i * bs
            return off <= s and end >= min(s + bs, old_size)

        edge = {i: p for i in {first, last} if not covered(i) and (p := old_ptr(0, i)) is not None}
        edge_idx = list(edge)
        prior = {}
        if edge_idx:
            raws = await self.access.get_many([(edge[i], self.leaf_kind) for i in edge_idx])
            prior = dict(zip(edge_idx, raws))

        # Leaves.
        new: dict[int, bytes | None] = {}
        puts, put_idx = [], []
        for i in range(first, last + 1):
            s = i * bs
            e = min(s + bs, new_size)
            if covered(i):
                content = bytes(data[s - off:min(e, end) - off])
            else:
                buf = bytearray(prior.get(i, b"")[:e - s])
                buf.extend(bytes(e - s - len(buf)))
                lo = max(off, s)
                hi = min(end, e)
                buf[lo - s:hi - s] = data[lo - off:hi - off]
                content = bytes(buf)
            content = content.rstrip(b"\0")
            new[i] = None
            if content:
                puts.append((self.leaf_kind, content))
                put_idx.append(i)
        if puts:
            for i, g in zip(put_idx, await self.access.put_many(puts)):
                new[i] = g

        # Bottom-up: each level's INDIRECT blocks in one batch.
        for lv in range(1, depth + 1):
            level: dict[int, bytes | None] = {}
            built, built_idx = [], []
            for idx in range(a[lv], b[lv] + 1):
                base = idx * fan
                lo, hi = max(a[lv - 1], base), min(b[lv - 1], base + fan - 1)
                kids = list(old.get((lv, idx), ()))
                kids.extend([None] * (hi - base + 1 - len(kids)))
                for c in range(lo, hi + 1):
                    kids[c - base] = new[c]
                while kids and kids[-1] is None:
                    kids.pop()
                level[idx] = None
                if kids:
                    assert _PENDING not in kids
                    built.append(tuple(kids))
                    built_idx.append(idx)
            for idx, g in zip(built_idx, await self._put_nodes(built)):
                level[idx] = g
            new = level
        return TreeRef(new_size, depth, new[0], None, bs, fan)

    async def truncate(self, ref: TreeRef, size: int) -> TreeRef:
        """The tree cut or zero-extended to ``size`` bytes."""
        if not 0 <= size <= MAX_SIZE:
            raise ValueError(f"size must be 0..{MAX_SIZE}")
        ref.check()
        if size == ref.size:
            return ref
        bs, fan = ref.block_size, ref.fanout
        if size <= self.inline_max and (ref.inline is not None or size < ref.size):
            head = await self.read(ref, 0, size)
            return TreeRef(size, 0, None, head + bytes(size - len(head)), bs, fan)
        if ref.inline is not None:  # grows past inline_max: spill
            sparse = TreeRef(size, depth_for(size, bs, fan), None, None, bs, fan)
            return await self._write_blocks(sparse, 0, memoryview(ref.inline))
        depth = depth_for(size, bs, fan)
        if size > ref.size:
            # Extend: nothing lies past the old end, so only levels are added.
            ptr = ref.root
            for _ in range(ref.depth, depth):
                if ptr is not None:
                    ptr = (await self._put_nodes([(ptr,)]))[0]
            return TreeRef(size, depth, ptr, None, bs, fan)
        # Shrink: walk the path to the new last leaf, cut it, drop what follows.
        k0 = (size - 1) // bs
        path: dict[int, tuple[bytes, tuple]] = {}
        p = ref.root
        for lv in range(ref.depth, 0, -1):
            if p is None:
                break
            kids = (await self._load_nodes([p], fan))[p]
            path[lv] = (p, kids)
            j = k0 // fan ** (lv - 1) - (k0 // fan ** lv) * fan
            p = kids[j] if j < len(kids) else None
        cut = size - k0 * bs
        if p is not None:
            raw = (await self.access.get_many([(p, self.leaf_kind)]))[0]
            if len(raw) > cut:
                content = raw[:cut].rstrip(b"\0")
                p = None
                if content:
                    p = (await self.access.put_many([(self.leaf_kind, content)]))[0]
        for lv in range(1, depth + 1):
            if lv not in path:
                p = None  # the whole path below a hole is holes
                continue
            oldp, kids = path[lv]
            j = k0 // fan ** (lv - 1) - (k0 // fan ** lv) * fan
            cut_kids = list(kids[:j]) + [p]
            while cut_kids and cut_kids[-1] is None:
                cut_kids.pop()
            if tuple(cut_kids) == kids:
                p = oldp
            elif cut_kids:
                p = (await self._put_nodes([tuple(cut_kids)]))[0]
            else:
                p = None
        return TreeRef(size, depth, p, None, bs, fan)

    # -- walks for GC, fsck and archiving ------------------------------------------

    async def _children(self, ptrs: set, fanout: int, nodes=None) -> set:
        """All children of the INDIRECT blocks ``ptrs`` (one batch)."""
        if nodes is None:
            nodes = await self._load_nodes(ptrs, fanout)
        return {c for p in ptrs for c in nodes[p] if c is not None}

    async def blocks_of(self, ref: TreeRef) -> AsyncIterator[tuple[bytes, Kind]]:
        """Every distinct block of the tree, top level first, as (BGUID, kind).
        Loads every INDIRECT block (one batch per level), no DATA block."""
        level = {ref.root} if ref.root is not None else set()
        for lv in range(ref.depth, -1, -1):
            kind = self.leaf_kind if lv == 0 else Kind.INDIRECT
            for p in level:
                yield p, kind
            if lv:
                level = await self._children(level, ref.fanout)

    async def diff(self, old: TreeRef, new: TreeRef) -> TreeDiff:
        """Exactly the blocks only in ``new`` and only in ``old``.

        Exact, including blocks shared at different offsets (convergent
        sealing deduplicates them), so ``removed`` is safe to collect when
        ``old`` is dropped and ``new`` kept. Walks both trees level by level;
        shared INDIRECT blocks are loaded once. Cost: every INDIRECT block of
        both trees (1/2048 of the data with the defaults)."""
        added, removed = set(), set()
        sa, sb = set(), set()
        for lv in range(max(old.depth, new.depth), -1, -1):
            if lv == old.depth and old.root is not None:
                sa.add(old.root)
            if lv == new.depth and new.root is not None:
                sb.add(new.root)
            kind = self.leaf_kind if lv == 0 else Kind.INDIRECT
            added.update((p, kind) for p in sb - sa)
            removed.update((p, kind) for p in sa - sb)
            if lv:
                # One batch for both trees, so shared blocks are fetched once.
                nodes = await self._load_nodes(sa | sb, max(old.fanout, new.fanout))
                sa = await self._children(sa, old.fanout, nodes)
                sb = await self._children(sb, new.fanout, nodes)
        return TreeDiff(frozenset(added), frozenset(removed))


class TreeReader:
    """Reads of one tree with read-ahead: while reads are sequential, each
    batch also fetches the next leaves (a window doubling up to
    ``max_ahead`` leaves, 2 MiB with the defaults), so a sequential reader
    waits on one ``get_many`` per window rather than one per call."""

    def __init__(self, tree: BlockTree, ref: TreeRef, *, max_ahead: int = 32):
        self.tree = tree
        self.ref = ref
        self.max_ahead = max_ahead
        self._ahead = 0
        self._next = 0
        self._held: dict[int, bytes | None] = {}  # leaf index -> content (None: hole)

    async def read(self, off: int, n: int) -> bytes:
        ref = self.ref
        end = _clamp(ref, off, n)
        if end <= off:
            return b""
        if ref.inline is not None or ref.root is None:
            return await self.tree.read(ref, off, n)
        bs = ref.block_size
        first, last = off // bs, (end - 1) // bs
        if off == self._next:
            self._ahead = min(max(1, 2 * self._ahead), self.max_ahead)
        else:
            self._ahead = 0
            self._held.clear()
        for i in [i for i in self._held if i < first]:
            del self._held[i]
        final = (ref.size - 1) // bs
        ready = last  # leaves after ``last`` already held
        while ready < final and ready + 1 in self._held:
            ready += 1
        hi = min(last + self._ahead, final)
        # Fetch when a needed leaf is missing or less than half the window
        # remains held, and then a whole window, so that batches stay large.
        if (any(i not in self._held for i in range(first, last + 1))
                or (ready < hi and ready - last < self._ahead // 2)):
            got = await self.tree._leaves(ref, first, hi, skip=self._held)
            for i in range(first, hi + 1):
                if i not in self._held:
                    self._held[i] = got.get(i)
        self._next = end
        return _assemble(bs, off, end, {i: self._held[i] for i in range(first, last + 1)
                                        if self._held[i] is not None})


def _clamp(ref: TreeRef, off: int, n: int) -> int:
    if off < 0 or n < 0:
        raise ValueError("negative offset or length")
    return min(off + n, ref.size)


def _assemble(bs: int, off: int, end: int, leaves: dict[int, bytes]) -> bytes:
    out = bytearray(end - off)  # holes and short leaves stay zero
    for i, raw in leaves.items():
        s = i * bs
        lo, hi = max(off, s), min(end, s + len(raw))
        if hi > lo:
            out[lo - off:hi - off] = raw[lo - s:hi - s]
    return bytes(out)
