"""What references each block of a volume, for fsck (DESIGN.md "What must
always hold": every block of every live version is checked; issue 9: each
problem says which files and versions it affects).

A :class:`LiveSet` maps every BGUID that fsck reached from the view (log
blocks, file data named by records, the blocks of snapshots, raw head and
view blocks) to the references that reach it (:class:`Ref`); the block
survey checks exactly these blocks, and ``storage.fsck_logs`` turns the
references of a damaged block into paths, versions and writers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .blockapi import Kind

MAX_REFS = 64           # references kept per block (a block shared by very many files)


class Ref(NamedTuple):
    """What one reference to a block is: ``what`` is "log" (a log block of
    ``writer`` holding records ``first``..``last``), "data" (file data
    written by record ``first`` of ``writer`` to inode ``ino``), "snapshot"
    (a block of snapshot ``root``) or "raw" (``label`` says: a head, a view)."""

    what: str
    label: str = ""
    writer: bytes | None = None
    first: int = 0
    last: int = 0
    ino: int = 0
    root: bytes | None = None
    time: int = 0


@dataclass
class LiveSet:
    refs: dict[bytes, list[Ref]] = field(default_factory=dict)
    kinds: dict[bytes, Kind | None] = field(default_factory=dict)

    def add(self, g: bytes, kind: Kind | None, ref: Ref) -> None:
        lst = self.refs.setdefault(g, [])
        if len(lst) < MAX_REFS:
            lst.append(ref)
        self.kinds.setdefault(g, kind)
