"""Where a mounted volume lives: the seam between the FUSE frontend and the
storage below it (DESIGN.md "p2pfs/" and "Process model").

A :class:`Backend` is attached for the life of a mount. Attached, it gives a
:class:`Session`: this node's identity, the volume's view, a
``BlockAccess`` for sealed blocks and a ``HeadBoard`` for log-heads. The
frontend builds the namespace (``storage.namespace``) from a session and
never asks how blocks are placed or heads certified. Two backends:

* :class:`LocalBackend`, here: the single-node volume (r = 1,
  ``storage.localstore``), kept in one directory;
* the network backend (replicated blocks over the overlay, heads certified
  by the inner ring), added behind the same interface: its ``attach`` starts
  or joins a node inside its own nursery and yields a session.

Layout of a single-node volume directory (written by :func:`mkfs_local`)::

    FORMAT        JSON: {"format": 1, "kind": "single-node", "quota": bytes}
    identity.key  the writer's Ed25519 key (mode 0600); it owns the volume
    view          the signed view: volume id, the writer, its wrapped volume key
    blocks/       LMDB block store (ciphertext only)
    heads/        LMDB log-head board
    lock          flock'ed while a process has the volume attached

The volume key is never stored in clear: the view holds it wrapped for the
writer's key, and ``attach`` unwraps it in memory. ``FORMAT`` is written
last, so a half-made directory is refused rather than mounted.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from overlay.wire.ids import Identity, IdentityError
from storage.blockapi import BlockAccess
from storage.blockstore import BlockStore
from storage.errors import StorageError
from storage.localstore import LocalBlocks, LocalHeadBoard
from storage.logs import HeadBoard
from storage.volume import View, create_volume

LOCAL_FORMAT = 1
DEFAULT_QUOTA = 64 << 30


class BackendError(Exception):
    """A volume could not be attached or created; the message says why and
    what to do. Nothing on disk was changed by the failed call."""


class VolumeBusy(BackendError):
    """Another process has this volume attached (mounted)."""


@dataclass
class Session:
    """What a mount runs on, valid while its backend is attached."""

    identity: Identity
    view: View
    blocks: BlockAccess
    board: HeadBoard
    replicas: int                       # copies kept of each block
    description: str                    # one line for logs and status
    space: Callable[[], Awaitable[tuple[int, int]]] | None = field(default=None)
    # A newer view of the volume when there is one (writers added or
    # removed), else None; polled while mounted. None: the view never changes.
    views: Callable[[], Awaitable[View | None]] | None = field(default=None)
    ring: object | None = field(default=None)      # the inner ring's client, if any

    @property
    def single_writer(self) -> bool:
        """True when this identity is the volume's only active writer: then
        nothing but this mount changes the file system, and the kernel may
        cache without bound (write-back cache, long timeouts)."""
        return self.view.active_ids() == {self.identity.id}


class Backend(abc.ABC):
    """A place a volume lives (module docstring)."""

    @abc.abstractmethod
    def attach(self, *, sync_close: bool = False
               ) -> contextlib.AbstractAsyncContextManager[Session]:
        """Open (or join) the storage and yield a :class:`Session`; detach
        and release everything on exit. Raises :class:`BackendError`.
        ``sync_close``: a close waits for the writer's new log-head to reach
        its disk, as fsync does (a backend whose closes always do ignores it)."""


# --------------------------------------------------------------------------
# The single-node volume


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def mkfs_local(volume_dir: str | os.PathLike, *, name: str = "p2pfs",
               identity: Identity | None = None, quota: int = DEFAULT_QUOTA) -> View:
    """Create a single-node volume in ``volume_dir`` (missing or empty): a new
    identity (or ``identity``), a view naming it the owner and only writer,
    a fresh volume key wrapped for it, an empty block store and head board.
    Returns the view. Refuses a directory that holds anything."""
    d = Path(volume_dir)
    if d.exists():
        if not d.is_dir():
            raise BackendError(f"{d} exists and is not a directory")
        if any(d.iterdir()):
            what = "a p2pfs volume" if (d / "FORMAT").exists() else "not empty"
            raise BackendError(f"cannot create a volume in {d}: it is {what}")
    if quota <= 0:
        raise BackendError("the quota must be positive")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ident = identity or Identity.generate()
    try:
        ident.save(d / "identity.key")
    except IdentityError as e:
        raise BackendError(str(e)) from None
    view, _key = create_volume(ident, name)
    _atomic_write(d / "view", view.encode())
    BlockStore(d / "blocks", quota=quota).close()
    LocalHeadBoard(d / "heads").close()
    fmt = {"format": LOCAL_FORMAT, "kind": "single-node", "quota": quota}
    _atomic_write(d / "FORMAT", json.dumps(fmt).encode() + b"\n")
    return view


def is_local_volume(volume_dir: str | os.PathLike) -> bool:
    return (Path(volume_dir) / "FORMAT").is_file()


class LocalBackend(Backend):
    """The single-node volume in ``volume_dir`` (module docstring)."""

    def __init__(self, volume_dir: str | os.PathLike):
        self.dir = Path(volume_dir)

    def _read_format(self) -> dict:
        try:
            fmt = json.loads((self.dir / "FORMAT").read_text())
        except FileNotFoundError:
            raise BackendError(f"{self.dir} is not a p2pfs volume (no FORMAT file); create "
                               f"one with mkfs") from None
        except (OSError, ValueError) as e:
            raise BackendError(f"{self.dir}/FORMAT is unreadable: {e}") from None
        if not isinstance(fmt, dict) or fmt.get("format") != LOCAL_FORMAT or fmt.get(
                "kind") != "single-node":
            raise BackendError(f"{self.dir}: volume format {fmt!r} is not a single-node "
                               f"volume of format {LOCAL_FORMAT}")
        if not isinstance(fmt.get("quota"), int) or fmt["quota"] <= 0:
            raise BackendError(f"{self.dir}/FORMAT: bad quota {fmt.get('quota')!r}")
        return fmt

    @contextlib.contextmanager
    def _locked(self):
        """Hold the volume's lock file (released by the kernel if we die)."""
        path = self.dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise VolumeBusy(f"volume {self.dir} is in use by another process "
                                 f"(pid {holder}); unmount it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def attach(self, *, sync_close: bool = False) -> AsyncIterator[Session]:
        # Every publish of this board is a synced transaction: sync_close holds.
        fmt = self._read_format()
        with self._locked():
            try:
                identity = Identity.load(self.dir / "identity.key")
                view = View.decode((self.dir / "view").read_bytes())
                key = view.volume_key(identity)
            except (IdentityError, StorageError, OSError) as e:
                raise BackendError(f"cannot open volume {self.dir}: {e}") from None
            try:
                # Read-ahead on: a volume's blocks are read file by file.
                store = BlockStore(self.dir / "blocks", quota=fmt["quota"], readahead=True)
            except StorageError as e:
                raise BackendError(f"cannot open the block store of {self.dir}: {e}") from None
            try:
                board = LocalHeadBoard(self.dir / "heads")
            except StorageError as e:
                store.close()
                raise BackendError(f"cannot open the head board of {self.dir}: {e}") from None
            blocks = LocalBlocks(store, key)
            try:
                yield Session(identity, view, blocks, board, replicas=1,
                              description=f"single-node volume {view.name!r} in {self.dir}",
                              space=blocks.space)
            finally:
                board.close()
                store.close()
