"""The block store's staging log: small puts acknowledged once appended to a
file, committed to LMDB in groups (DESIGN.md "storage/blocks", "What must
always hold"; ``storage.blockstore``, "Staged puts").

Why. A small file's close is one ``blk.store`` of a few kilobytes to each of
r holders. Committing it to LMDB at once costs a write transaction and two
fsyncs per holder, on the close's critical path, at every holder, for every
file. Appended to this log instead, the put costs one ``write(2)``; a
group of them is committed to LMDB in one transaction (one pair of fsyncs)
a moment later.

What an acknowledgement then promises: the block is in the holder's file
system (its page cache), so it survives the holder *process* being killed
(``kill -9`` included) and is committed within ``STAGE_DELAY`` seconds or
at the next operation that needs the store exact. A power loss of the
holder's machine inside that window can lose it there. DESIGN.md's
invariant counts failed holders: data acknowledged by r holders survives
r-1 of them failing, and a holder that keeps running keeps what its page
cache holds. Only a power loss of all r holders inside the same window
(the demo's nodes share one machine) loses a close; ``SECURITY.md``
("Durability") records this choice and its reasons.

File format (``stage.log`` beside ``data.mdb``): entries appended back to
back, nothing else. Each entry::

    magic  b"P2SG"
    gen    >Q   the generation the entry belongs to
    flags  >B   bit 0: revive (the put's ``revive`` argument)
    time   >d   when the put was staged (its ``stored_at``)
    length >I   of the block
    bguid  32 bytes
    data   ``length`` bytes

Entries are self-checking: a block's BGUID is the SHA-256 of its bytes. A
torn tail (a crash in the middle of an append, or a machine crash before the
page cache reached the disk) fails the check, and reading stops there.

Generations. Committing the staged entries writes ``meta[b"stage_gen"] =
gen`` in the same LMDB transaction; afterwards the log is truncated (no
fsync) and later entries carry ``gen + 1``. On open, only entries with a
generation above the committed one are replayed. So a truncation that never
reached the disk cannot bring back entries already committed (and perhaps
deleted since: a collected block must not be resurrected), nor can stale
bytes of an old generation found after newer entries.

One process stages into a store's log at a time: the staging process holds
an exclusive ``flock`` on it. Another process opening the store (a tool)
leaves the log to its owner; with no owner it replays it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import StorageError, StoreFull

STAGE_FILE = "stage.log"
STAGE_DELAY = 0.1                # seconds from the first staged put to its commit
STAGE_MAX_BYTES = 8 << 20        # staged bytes that force a commit
STAGE_MAX_ENTRIES = 4096         # staged blocks that force a commit
STAGE_BELOW = 64 << 10           # puts of fewer bytes are staged (a small file's blocks)

MAGIC = b"P2SG"
_HEAD = struct.Struct(">4sQBdI")
HEAD_BYTES = _HEAD.size + 32
REVIVE = 1


@dataclass(slots=True)
class Staged:
    """One staged block."""
    data: bytes
    revive: bool
    at: float


def encode(gen: int, bguid: bytes, data: bytes, revive: bool, at: float) -> bytes:
    return _HEAD.pack(MAGIC, gen, REVIVE if revive else 0, at, len(data)) + bguid + data


def decode_all(buf: bytes, after_gen: int, max_len: int) -> tuple[list[tuple[bytes, Staged]], int]:
    """The entries of generation ``after_gen + 1`` at the start of ``buf``
    in order, up to the first that is torn, damaged or of another
    generation; and how many bytes those took."""
    out: list[tuple[bytes, Staged]] = []
    pos = 0
    want = after_gen + 1
    while pos + HEAD_BYTES <= len(buf):
        magic, gen, flags, at, n = _HEAD.unpack_from(buf, pos)
        if magic != MAGIC or gen != want or n > max_len or flags & ~REVIVE:
            break
        start = pos + HEAD_BYTES
        end = start + n
        if end > len(buf):
            break
        g = bytes(buf[pos + _HEAD.size:start])
        data = bytes(buf[start:end])
        if hashlib.sha256(data).digest() != g:
            break
        out.append((g, Staged(data, bool(flags & REVIVE), at)))
        pos = end
    return out, pos


def append_whole(fd: int, size: int, buf: bytes, what: str) -> None:
    """Write ``buf`` at offset ``size`` of the log file ``fd`` (its end),
    whole, or leave the file as it was: StoreFull when the disk is full,
    StorageError for any other failure (``what`` names the file)."""
    done = 0
    try:
        while done < len(buf):
            done += os.pwrite(fd, buf[done:], size + done)
    except OSError as e:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass    # the next append overwrites the torn bytes anyway (pwrite at size)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(f"disk full writing {what}") from None
        raise StorageError(f"cannot write {what}: {e.strerror}") from None


class StageLog:
    """The open log file of a staging store (module docstring)."""

    def __init__(self, path: Path, *, own: bool):
        """Open (creating) the log. ``own``: take it for staging (exclusive
        lock, StorageError if another process has it); otherwise
        ``self.owned`` says whether the lock could be had (then the caller
        may replay and truncate)."""
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open the staging log {path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.owned = True
        except OSError as e:
            self.owned = False
            if own or e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(self.fd)
                raise StorageError(f"the staging log {path} is in use by another process "
                                   f"(is a node running on this store?)") from None
        self.size = os.fstat(self.fd).st_size

    def read(self) -> bytes:
        return os.pread(self.fd, self.size, 0) if self.size else b""

    def append(self, buf: bytes) -> None:
        """Append ``buf`` whole, or leave the log as it was (StoreFull when
        the disk is full, StorageError for any other failure)."""
        append_whole(self.fd, self.size, buf, f"the staging log {self.path}")
        self.size += len(buf)

    def truncate(self) -> None:
        """Start over: later entries are written from the start. Freeing
        the space is a courtesy; correctness does not need it, since bytes
        left behind belong to a committed generation."""
        self.size = 0
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)     # releases the lock
            self.fd = -1
