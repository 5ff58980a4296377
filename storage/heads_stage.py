"""The head board's staging log: a close's write-ahead head kept in a file
at once and committed to the board's LMDB (with its fsync) in groups
(``storage.localstore.LocalHeadBoard``, ``stage=True``; DESIGN.md "What must
always hold"; SECURITY.md "Durability").

Why. A close stores its blocks at r holders and, at the same time, makes
the writer's new log-head durable locally together with the blocks' bytes
(``HeadBoard.publish_ahead``), so that a crash between the two is repaired
at the next mount. That local write was an LMDB transaction with its two
fsyncs in a worker thread: the fsync itself overlapped the holders' round
trip, but handing each close's write to a thread and back cost the mount's
trio thread about an eighth of a small file's time (measured side by side,
``bench/small_ab.py``: the same code with the write made on the trio thread
and not synced ran 1.13-1.15x faster; synced in the thread but without the
fsync, 1.006x). Appended to this log instead, the head costs one
``write(2)`` on the trio thread, and the board commits what is staged to
LMDB, synced, ``AHEAD_DELAY`` seconds later in a worker thread.

What a close then promises on the writer's side: its head and journal are
in the writer's file system (page cache), so they survive the mount
process being killed (``kill -9`` included) and reach the disk within
``AHEAD_DELAY`` seconds. A power loss of the writer's machine inside that
window can lose the close (its blocks are at the holders, but no head names
them). ``fsync(2)`` commits what is staged before it returns
(``LocalHeadBoard.flush``), so what fsync returned for survives that too.

File format (``ahead.log`` in the board's directory): entries back to
back, nothing else. Each entry::

    magic   b"P2HA"
    length  >I   of the payload
    digest  32 bytes: SHA-256 of the payload
    payload msgpack [encoded head, packed journal or nil]

Entries are self-checking; reading stops at the first that is torn or
damaged (a crash in the middle of an append, or a machine crash before the
page cache reached the disk). Replay keeps, for each writer, the entry with
the highest publish counter, and commits it only if it is newer than the
head LMDB holds. So order and repetition do not matter: an entry already
committed loses to (or equals) the stored head. That is what lets a commit
rewrite the log with only what is still staged (a new file renamed over the
old) without care for a crash in the middle.

One process stages into a board at a time: it holds an exclusive ``flock``
on ``ahead.lock``. A tool that opens the board while a mount has it reads
the committed heads only (at most ``AHEAD_DELAY`` seconds behind); with no
owner, it replays the log first.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from pathlib import Path

import msgpack

from .blockstore_stage import append_whole
from .errors import StorageError

AHEAD_FILE = "ahead.log"
AHEAD_LOCK = "ahead.lock"
AHEAD_DELAY = 0.1               # seconds from the first staged head to its commit
MAX_PAYLOAD = 64 << 20          # a journal is at most a few hundred KiB (AHEAD_BYTES)

MAGIC = b"P2HA"
_HDR = struct.Struct(">4sI")
HDR_BYTES = _HDR.size + 32


def encode_entry(raw_head: bytes, packed: bytes | None) -> bytes:
    payload = msgpack.packb([raw_head, packed])
    return _HDR.pack(MAGIC, len(payload)) + hashlib.sha256(payload).digest() + payload


def decode_entries(buf: bytes) -> tuple[list[tuple[bytes, bytes | None]], int]:
    """The whole entries at the start of ``buf`` as (encoded head, packed
    journal or None), up to the first that is torn or damaged; and how many
    bytes those took."""
    out: list[tuple[bytes, bytes | None]] = []
    pos = 0
    while pos + HDR_BYTES <= len(buf):
        magic, n = _HDR.unpack_from(buf, pos)
        if magic != MAGIC or n > MAX_PAYLOAD:
            break
        start = pos + HDR_BYTES
        end = start + n
        if end > len(buf):
            break
        payload = bytes(buf[start:end])
        if hashlib.sha256(payload).digest() != buf[pos + _HDR.size:start]:
            break
        try:
            item = msgpack.unpackb(payload)
        except (ValueError, msgpack.UnpackException):
            break
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], bytes)
                or not (item[1] is None or isinstance(item[1], bytes))):
            break
        out.append((item[0], item[1]))
        pos = end
    return out, pos


class AheadLog:
    """The staging log of one head board directory (module docstring)."""

    def __init__(self, directory: Path, *, own: bool):
        """Take the board's lock. ``own``: for staging (StorageError if
        another process has it); otherwise ``self.owned`` says whether it
        could be had (then the caller may replay and empty the log)."""
        self.path = directory / AHEAD_FILE
        self.fd = -1
        self.size = 0
        try:
            self._lock_fd = os.open(directory / AHEAD_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        except OSError as e:
            raise StorageError(f"cannot open {directory / AHEAD_LOCK}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.owned = True
        except OSError as e:
            self.owned = False
            if own or e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(self._lock_fd)
                raise StorageError(f"the head board {directory} is in use by another process "
                                   f"(is a mount of this volume running?)") from None
        if self.owned:
            try:
                self._open()
            except BaseException:
                os.close(self._lock_fd)
                raise

    def _open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open the head log {self.path}: {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size

    def read(self) -> bytes:
        return os.pread(self.fd, self.size, 0) if self.size else b""

    def append(self, buf: bytes) -> None:
        """Append ``buf`` whole, or leave the log as it was (StoreFull when
        the disk is full, StorageError for any other failure)."""
        append_whole(self.fd, self.size, buf, f"the head log {self.path}")
        self.size += len(buf)

    def rewrite(self, buf: bytes) -> None:
        """Make ``buf`` the whole log: emptied in place when ``buf`` is
        empty, else a new file renamed over the old one. On failure the log
        stays as it was, which replays to the same heads (module docstring)."""
        if not buf:
            try:
                os.ftruncate(self.fd, 0)
                self.size = 0
            except OSError:
                pass
            return
        tmp = self.path.with_name(AHEAD_FILE + ".new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                done = 0
                while done < len(buf):
                    done += os.pwrite(fd, buf[done:], done)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        os.close(self.fd)
        self._open()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)      # releases the lock
            self._lock_fd = -1
