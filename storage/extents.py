"""A file's bytes as a map of extents, computed from Write records (Ivy
section 3: file contents are never stored whole, they are replayed).

An extent says: bytes ``[off, end)`` of the file are bytes ``[soff, soff +
end - off)`` of a source, either inline bytes taken from a Write record or a
``Kind.DATA`` block named by its BGUID (:class:`Blk`). Extents are kept
sorted and never overlap; a gap between them, or past the last one up to the
file's size, reads as zeros (a hole).

Every mutation returns what it removed, so a caller can undo it exactly:
``punch(a, b)`` then ``insert(removed)`` restores the map. ``fsapply`` keeps
these undo notes for the records of a file that other writers may not have
seen yet, to rebuild the file as one side of a conflict saw it.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple


class Blk(NamedTuple):
    """An extent source that is a DATA block."""

    bguid: bytes


Source = bytes | Blk


class Extent(NamedTuple):
    off: int
    end: int
    src: Source
    soff: int

    @property
    def length(self) -> int:
        return self.end - self.off


def _start(e: Extent) -> int:
    return e.off


class Extents:
    """Sorted, non-overlapping extents of one file."""

    __slots__ = ("_ext",)

    def __init__(self, extents: list[Extent] | None = None):
        self._ext: list[Extent] = list(extents or ())

    def copy(self) -> "Extents":
        return Extents(self._ext)

    def __iter__(self):
        return iter(self._ext)

    def __len__(self) -> int:
        return len(self._ext)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Extents) and self._ext == other._ext

    def _first_overlapping(self, off: int) -> int:
        i = bisect_right(self._ext, off, key=_start) - 1
        if i >= 0 and self._ext[i].end > off:
            return i
        return i + 1

    def punch(self, off: int, end: int) -> list[Extent]:
        """Remove bytes [off, end); return the extents (clipped) that were there."""
        if end <= off:
            return []
        ext = self._ext
        i = self._first_overlapping(off)
        j = i
        kept: list[Extent] = []
        removed: list[Extent] = []
        while j < len(ext) and ext[j].off < end:
            e = ext[j]
            if e.off < off:
                kept.append(Extent(e.off, off, e.src, e.soff))
            lo, hi = max(e.off, off), min(e.end, end)
            removed.append(Extent(lo, hi, e.src, e.soff + (lo - e.off)))
            if e.end > end:
                kept.append(Extent(end, e.end, e.src, e.soff + (end - e.off)))
            j += 1
        if j > i:
            ext[i:j] = kept
        return removed

    def insert(self, extents: list[Extent]) -> None:
        """Put back extents that overlap nothing present (after a punch).
        Neighbours that continue each other in the same source are merged,
        so a punch followed by re-inserting what it removed restores the
        exact same extents."""
        ext = self._ext
        for e in extents:
            i = bisect_right(ext, e.off, key=_start)
            if i > 0 and _continues(ext[i - 1], e):
                p = ext[i - 1]
                e = Extent(p.off, e.end, p.src, p.soff)
                i -= 1
                del ext[i]
            if i < len(ext) and _continues(e, ext[i]):
                e = Extent(e.off, ext[i].end, e.src, e.soff)
                del ext[i]
            ext.insert(i, e)

    def write(self, off: int, length: int, src: Source, soff: int = 0) -> list[Extent]:
        """Bytes [off, off+length) now come from ``src`` at ``soff``; returns
        what they replaced."""
        removed = self.punch(off, off + length)
        if length > 0:
            self.insert([Extent(off, off + length, src, soff)])
        return removed

    def plan(self, off: int, end: int) -> list[Extent]:
        """The extents covering [off, end), clipped to it; gaps are holes."""
        out = []
        ext = self._ext
        i = self._first_overlapping(off)
        while i < len(ext) and ext[i].off < end:
            e = ext[i]
            lo, hi = max(e.off, off), min(e.end, end)
            out.append(Extent(lo, hi, e.src, e.soff + (lo - e.off)))
            i += 1
        return out

    def blocks(self) -> set[bytes]:
        """BGUIDs of every DATA block the file refers to."""
        return {e.src.bguid for e in self._ext if isinstance(e.src, Blk)}

    @property
    def end(self) -> int:
        """End of the last extent (0 when empty)."""
        return self._ext[-1].end if self._ext else 0


class Undo(NamedTuple):
    """How to revert one data change of a file: its size before, the range
    the change covered (None for a pure size change) and what it removed."""

    old_size: int
    off: int
    end: int
    removed: list[Extent]


def revert(data: Extents, undo: Undo) -> int:
    """Revert one change on ``data`` (which must be exactly as the change
    left it); returns the size before the change."""
    data.punch(undo.off, undo.end)
    data.insert(undo.removed)
    return undo.old_size


def _continues(a: Extent, b: Extent) -> bool:
    """Whether ``b`` picks up exactly where ``a`` ends, in the same source."""
    return (a.end == b.off and a.soff + a.length == b.soff
            and (a.src is b.src or (isinstance(a.src, Blk) and a.src == b.src)))
