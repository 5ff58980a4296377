"""POSIX errors of the namespace API (DESIGN.md "p2pfs/": each FUSE
operation maps the log layer's errors to errno at one boundary).

Every error the namespace raises on purpose is an :class:`FsError` carrying
its ``errno``; the FUSE frontend turns any ``FsError`` into
``FUSEError(e.errno)`` in one place. Subclasses exist for the errors callers
test for by name; a rare one may be raised as ``FsError(errno.X, msg)``.
"""

from __future__ import annotations

import errno as _errno

from .errors import StorageError


class FsError(StorageError):
    """A file-system operation failed with the POSIX error ``errno``."""

    errno: int = _errno.EIO

    def __init__(self, errno: int | None = None, msg: str = ""):
        if errno is not None:
            self.errno = errno
        super().__init__(msg or _errno.errorcode.get(self.errno, str(self.errno)))


class _Named(FsError):
    """An FsError whose errno is fixed by its class: raise ``NotFound("why")``."""

    def __init__(self, msg: str = ""):
        super().__init__(None, msg)


class NotFound(_Named):
    """ENOENT: the name is not in the directory, or the inode no longer exists."""

    errno = _errno.ENOENT


class Exists(_Named):
    """EEXIST: the name to create is already taken (or an exclusive create lost its race)."""

    errno = _errno.EEXIST


class NotEmpty(_Named):
    """ENOTEMPTY: rmdir of, or rename over, a directory that still has entries."""

    errno = _errno.ENOTEMPTY


class IsADirectory(_Named):
    """EISDIR: a file operation (read, write, unlink, truncate) on a directory, or renaming
    a non-directory over a directory."""

    errno = _errno.EISDIR


class NotADirectory(_Named):
    """ENOTDIR: a directory operation on something that is not a directory, or renaming a
    directory over a non-directory."""

    errno = _errno.ENOTDIR


class InvalidArgument(_Named):
    """EINVAL: a bad argument: a negative offset, readlink of a non-symlink, renaming a
    directory into its own subtree, ``.`` or ``..`` as a rename operand, unknown flags."""

    errno = _errno.EINVAL


class NameTooLong(_Named):
    """ENAMETOOLONG: a name over 255 bytes or a symlink target over 4096 bytes."""

    errno = _errno.ENAMETOOLONG


class CrossDevice(_Named):
    """EXDEV: a link or rename between two volumes."""

    errno = _errno.EXDEV


class NotPermitted(_Named):
    """EPERM: an operation POSIX forbids outright, such as a hard link to a directory."""

    errno = _errno.EPERM


class Busy(_Named):
    """EBUSY: removing or renaming the root directory."""

    errno = _errno.EBUSY


class NoData(_Named):
    """ENODATA: the extended attribute does not exist."""

    errno = _errno.ENODATA


class ReadOnly(_Named):
    """EROFS: this client is not a writer of the volume (or was removed from it)."""

    errno = _errno.EROFS


class TooBig(_Named):
    """E2BIG: an extended attribute value over the limit."""

    errno = _errno.E2BIG


class FileTooBig(_Named):
    """EFBIG: a size or offset past the largest file this volume allows."""

    errno = _errno.EFBIG


class OutOfRange(_Named):
    """ERANGE: an extended attribute name that is empty or over 255 bytes."""

    errno = _errno.ERANGE


class NotSupported(_Named):
    """EOPNOTSUPP: an operation this file system does not implement (device nodes)."""

    errno = _errno.EOPNOTSUPP


class IOFailure(_Named):
    """EIO: data could not be read (a block missing or corrupt on every holder), or the
    volume's logs are inconsistent (a rolled-back or forked log-head); the
    cause is chained."""

    errno = _errno.EIO
