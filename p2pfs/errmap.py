"""The one table that turns errors into errno for the kernel (DESIGN.md
"p2pfs/": each FUSE operation maps the log layer's errors to errno at one
boundary; STYLE.md section 3).

Every FUSE handler of ``p2pfs.fs`` runs inside :func:`fuse_op`, so nothing
but ``FUSEError`` ever reaches pyfuse3 (any other exception would end its
main loop, and with it the mount). The rules:

* ``FsError`` carries its own errno: the namespace chose POSIX semantics
  where the error arose. Everyday answers (ENOENT, EEXIST, ...) are logged
  at debug level only. An EIO whose chained cause maps to a more telling
  errno (a full store: ENOSPC) answers with that one;
* storage, ring, overlay and wire errors map through :data:`TABLE`, first
  match wins, and are logged with the operation, its inode or handle, the
  BGUID or writer at fault and the reason;
* anything else is a bug: EIO, logged with its traceback.

So no EIO reaches a program without a log line that says why.
"""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

from overlay.errors import NoRoute, OverlayError
from overlay.wire.ids import short
from overlay.wire.transport import PeerError, RemoteError, RequestTimeout
from storage.errors import (BadBlock, BlockCorrupt, BlockError, BlockNotFound, BlockTooLarge,
                            HolderRefused, StorageError, StoreClosed, StoreFull)
from storage.fs_errors import FsError
from storage.logs import LogError
from storage.ring_errors import NotAuthorised, RingUnavailable
from storage.volume import KeyUnwrapError, NotAParticipant

log = logging.getLogger("p2pfs.fs")

# errno values that are ordinary answers, not failures: debug-level only.
QUIET = frozenset({
    errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA, errno.EISDIR, errno.ENOTDIR,
    errno.EINVAL, errno.ENAMETOOLONG, errno.EPERM, errno.EACCES, errno.EXDEV, errno.ERANGE,
    errno.E2BIG, errno.EROFS, errno.EOPNOTSUPP, errno.EBUSY, errno.EFBIG,
})

WARNING, ERROR = logging.WARNING, logging.ERROR

# (error class, errno, log level, what it means for the user)
TABLE: list[tuple[type[BaseException], int, int, str]] = [
    (StoreFull, errno.ENOSPC, WARNING, "no block store can take the data"),
    (BlockNotFound, errno.EIO, ERROR, "a block is missing on every holder"),
    (BlockCorrupt, errno.EIO, ERROR, "a block failed verification on every holder"),
    (BadBlock, errno.EIO, ERROR, "a stored block is not of the expected format or kind"),
    (BlockTooLarge, errno.EIO, ERROR, "a block over the size limit (a bug)"),
    (HolderRefused, errno.EIO, WARNING, "block holders refused the request"),
    (StoreClosed, errno.EIO, ERROR, "the block store is closed (shutting down)"),
    (BlockError, errno.EIO, ERROR, "a block could not be used"),
    (LogError, errno.EIO, ERROR, "a writer's log is inconsistent (rolled back, forked "
                                 "or corrupt)"),
    (KeyUnwrapError, errno.EACCES, ERROR, "this identity cannot open the volume key"),
    (NotAParticipant, errno.EACCES, ERROR, "this identity is not a member of the volume"),
    (NotAuthorised, errno.EACCES, ERROR, "the inner ring refused this writer"),
    (RingUnavailable, errno.EIO, WARNING, "the inner ring is unreachable"),
    (RequestTimeout, errno.ETIMEDOUT, WARNING, "a peer did not answer in time"),
    (PeerError, errno.EIO, WARNING, "a peer could not be reached"),
    (RemoteError, errno.EIO, WARNING, "a peer refused the request"),
    (NoRoute, errno.EIO, WARNING, "no route through the overlay"),
    (OverlayError, errno.EIO, WARNING, "the overlay failed"),
    (StorageError, errno.EIO, ERROR, "storage failed"),
]


def _where(e: BaseException) -> str:
    """The BGUID, writer or peer an error names, if any."""
    parts = []
    if isinstance(e, BlockError) and e.bguid is not None:
        parts.append(f"block {short(e.bguid)}")
    if isinstance(e, LogError) and e.writer is not None:
        parts.append(f"writer {short(e.writer)}")
    peer = getattr(e, "peer_id", None)
    if isinstance(peer, bytes):
        parts.append(f"peer {short(peer)}")
    return (" [" + ", ".join(parts) + "]") if parts else ""


def _cause(e: BaseException) -> str:
    c = e.__cause__
    return f" (cause: {type(c).__name__}: {c}{_where(c)})" if c is not None else ""


def _table_errno(e: BaseException) -> int | None:
    return next((code for cls, code, _, _ in TABLE if isinstance(e, cls)), None)


def errno_of(e: BaseException, what: str) -> int:
    """Log ``e`` (raised by ``what``, e.g. ``"read(fh 3, ino 0x...)"``) as it
    deserves and return the errno to answer with."""
    if isinstance(e, pyfuse3.FUSEError):
        return e.errno
    if isinstance(e, FsError):
        if e.errno == errno.EIO and e.__cause__ is not None and not isinstance(
                e.__cause__, FsError):
            # The namespace reports storage failures as EIO and chains the
            # cause; a cause with an errno of its own (a full store: ENOSPC)
            # tells the program more.
            code = _table_errno(e.__cause__)
            if code not in (None, errno.EIO):
                log.warning("%s: %s: %s%s", what, errno.errorcode[code], e, _cause(e))
                return code
        level = logging.DEBUG if e.errno in QUIET else ERROR
        if log.isEnabledFor(level):
            log.log(level, "%s: %s: %s%s", what, errno.errorcode.get(e.errno, e.errno), e,
                    _cause(e))
        return e.errno
    for cls, code, level, meaning in TABLE:
        if isinstance(e, cls):
            log.log(level, "%s: %s (%s): %s%s%s", what, errno.errorcode[code], meaning, e,
                    _where(e), _cause(e))
            return code
    if isinstance(e, OSError) and e.errno:
        log.error("%s: local error %s", what, e, exc_info=e)
        return e.errno
    log.error("%s: bug, answering EIO: %s: %s", what, type(e).__name__, e, exc_info=e)
    return errno.EIO


def describe(op: str, args: tuple) -> str:
    """``op(arg, ...)`` for logs: numbers and short names, no payloads."""
    shown = []
    for a in args:
        if isinstance(a, bool):
            shown.append(str(a))
        elif isinstance(a, int):
            shown.append(hex(a) if a > 0xFFFF else str(a))
        elif isinstance(a, (bytes, str)):
            shown.append(repr(a) if len(a) <= 80 else f"<{len(a)} bytes>")
    return f"{op}({', '.join(shown)})"


def fuse_op(fn):
    """Run a FUSE handler so that only ``FUSEError`` leaves it (module
    docstring). Cancellation (a BaseException) passes through untouched."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(errno_of(e, describe(name, args))) from None

    return wrapper
