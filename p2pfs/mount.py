"""Mounting a volume: the FUSE session's life on trio (DESIGN.md "p2pfs/";
STYLE.md section 4: one nursery, one teardown path; signals end the session).

:func:`serve` is the whole life of a mount, in this order:

1. check the mount point: an existing, empty directory that nothing is
   mounted on. A *stale* FUSE mount left by a process that died (``stat``
   or, since stat may be answered from the kernel's cache, ``statfs`` fails
   with ENOTCONN) is detached with ``fusermount3 -u -z`` and reported;
2. attach the backend (``p2pfs.backend``) and mount the namespace;
3. ``pyfuse3.init`` with ``fsname=p2pfs``, ``subtype=p2pfs``,
   ``default_permissions`` and ``allow_other`` (the kernel checks modes and
   owners for every local user; DESIGN.md says why), plus ``nosuid`` and
   ``nodev``: files come from other writers of the volume, and a set-uid
   binary or a device node planted by one must not act on this machine;
4. serve requests until unmounted. SIGINT, SIGTERM or SIGHUP unmounts cleanly
   (``fusermount3 -u`` while still serving, so the kernel writes back its
   dirty pages through us first); if the mount is busy it is detached
   lazily instead (``pyfuse3.terminate``). A second signal stops at once;
5. always, even when cancelled: store buffered writes and publish the
   log-head (the final sync), unmount if still mounted, detach the backend.

Entry points: :func:`mount_local` (for the CLI), :func:`mkfs_local`
(re-exported from ``p2pfs.backend``) and ``python -m p2pfs.mount``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import trio

from storage.errors import StorageError
from storage.namespace import Namespace

from .backend import Backend, BackendError, LocalBackend, is_local_volume, mkfs_local
from .errmap import errno_of
from .fs import CachePolicy, P2pfsOperations

__all__ = ["MountError", "serve", "mount_local", "mkfs_local", "unmount", "is_mounted",
           "is_live", "main"]

log = logging.getLogger("p2pfs.mount")

FUSE_OPTIONS = frozenset({"fsname=p2pfs", "subtype=p2pfs", "default_permissions",
                          "allow_other", "nosuid", "nodev"})
READ_AHEAD_KB = 4096            # kernel read-ahead of the mount (default 128 KiB)
MOUNT_WAIT = 60.0               # seconds a background mount may take to appear
FINAL_SYNC_TIMEOUT = 120.0      # seconds the final sync may take at unmount
VIEW_POLL = 5.0                 # seconds between checks for a newer view of the volume


class MountError(Exception):
    """The file system could not be mounted or unmounted: a bad mount point
    (missing, not a directory, not empty, already mounted) or FUSE refused.
    The message says what to do."""


# --------------------------------------------------------------------------
# Mount points


def _mountinfo(mp: Path) -> list[str] | None:
    """The /proc/self/mountinfo fields of the mount at ``mp`` (the newest),
    read without touching the file system itself (which may be ours)."""
    target = os.fsencode(mp)
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                point = fields[4].replace(b"\\040", b" ").replace(b"\\011", b"\t") \
                    .replace(b"\\012", b"\n").replace(b"\\134", b"\\")
                if point == target:
                    found = [x.decode(errors="replace") for x in fields]
    except OSError:
        return None
    return found


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    """Whether anything (a live or a stale mount) is mounted there."""
    return _mountinfo(Path(os.path.abspath(mountpoint))) is not None


def is_live(mountpoint: str | os.PathLike) -> bool:
    """Whether a file system is mounted there and answering: a stale mount
    left by a dead server is listed but fails with ENOTCONN."""
    if not is_mounted(mountpoint):
        return False
    try:
        os.stat(mountpoint)
    except OSError:
        return False
    return True


def _fusermount(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["fusermount3", *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(["fusermount3", *args], 1, "", str(e))


def clear_stale(mp: Path) -> None:
    """Detach a dead FUSE mount from ``mp`` and say so."""
    log.warning("%s is a stale mount (transport endpoint not connected): the process that "
                "served it died. Detaching it with `fusermount3 -u -z %s`.", mp, mp)
    r = _fusermount("-u", "-z", str(mp))
    if r.returncode != 0:
        raise MountError(f"cannot clear the stale mount at {mp}: {r.stderr.strip()}; "
                         f"try `umount -l {mp}` as root")


def _dead(mp: Path) -> bool:
    """Whether the file system mounted at ``mp`` has no server any more."""
    try:
        os.statvfs(mp)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def check_mountpoint(mountpoint: str | os.PathLike) -> Path:
    """The absolute mount point, once it is fit to mount on (module
    docstring, step 1); raises MountError otherwise."""
    mp = Path(os.path.abspath(mountpoint))
    try:
        st = os.stat(mp)
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            clear_stale(mp)
            return check_mountpoint(mp)
        if e.errno == errno.ENOENT:
            raise MountError(f"mount point {mp} does not exist; create it with mkdir") from None
        raise MountError(f"cannot use mount point {mp}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mp} is not a directory")
    info = _mountinfo(mp)
    if info is not None and _dead(mp):
        # stat above may have been answered from the kernel's attribute
        # cache (60 s for a single writer); statfs always asks the server.
        clear_stale(mp)
        return check_mountpoint(mp)
    if info is not None or os.path.ismount(mp):
        what = f" ({info[-3]} from {info[-2]})" if info else ""
        raise MountError(f"{mp} is already a mount point{what}; unmount it first "
                         f"(fusermount3 -u {mp})")
    try:
        entries = os.listdir(mp)
    except OSError as e:
        raise MountError(f"cannot list mount point {mp}: {e.strerror}") from None
    if entries:
        raise MountError(f"mount point {mp} is not empty ({len(entries)} entries); "
                         f"mount on an empty directory")
    return mp


def unmount(mountpoint: str | os.PathLike, *, lazy: bool = False) -> None:
    """Unmount a p2pfs mount (its process then finishes and exits)."""
    args = ["-u", "-z"] if lazy else ["-u"]
    r = _fusermount(*args, str(os.path.abspath(mountpoint)))
    if r.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {r.stderr.strip()}")


def _tune_kernel(mp: Path) -> None:
    """Bigger kernel read-ahead for this mount (its backing device info is
    per FUSE connection); best effort."""
    info = _mountinfo(mp)
    if info is None:
        return
    path = Path("/sys/class/bdi") / info[2] / "read_ahead_kb"
    try:
        path.write_text(str(READ_AHEAD_KB))
    except OSError as e:
        log.debug("cannot set %s: %s", path, e)


# --------------------------------------------------------------------------
# Serving


async def _on_signals(mp: Path, cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("%s: unmounting %s", name, mp)
            break
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_unmount_or_detach, mp)
            async for signum in signals:
                log.warning("second signal: stopping now, without waiting for the kernel")
                pyfuse3.terminate()
                cancel.cancel()
                return


async def _unmount_or_detach(mp: Path) -> None:
    # While we keep serving, a real unmount lets the kernel write back its
    # dirty pages through us; the session loop then ends by itself.
    r = await trio.to_thread.run_sync(_fusermount, "-u", str(mp))
    if r.returncode != 0:
        log.warning("%s is busy (%s); detaching it lazily: open files there lose "
                    "writes not yet flushed", mp, r.stderr.strip())
        pyfuse3.terminate()


async def serve(backend: Backend, mountpoint: str | os.PathLike, *, debug: bool = False,
                sync_close: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount ``backend``'s volume at ``mountpoint`` and serve it until it is
    unmounted or a signal arrives (module docstring). ``task_status`` gets
    the absolute mount point once the kernel has the mount. ``sync_close``:
    see ``Backend.attach``."""
    mp = check_mountpoint(mountpoint)
    async with backend.attach(sync_close=sync_close) as session:
        try:
            ns = await Namespace.mount(session.view, session.identity, session.blocks,
                                       session.board)
        except StorageError as e:
            raise MountError(f"cannot read the volume: {e}") from e
        policy = CachePolicy.for_writers(session.single_writer)
        ops = P2pfsOperations(ns, policy, replicas=session.replicas, space=session.space,
                              description=session.description)
        options = set(FUSE_OPTIONS) | ({"debug"} if debug else set())
        async with trio.open_nursery() as nursery:
            await nursery.start(ops.run)
            if session.views is not None:
                nursery.start_soon(_watch_view, session, ns)
            try:
                pyfuse3.init(ops, str(mp), options)
            except RuntimeError as e:
                raise MountError(f"FUSE refused to mount at {mp}: {e} (see the message "
                                 f"above)") from None
            try:
                nursery.start_soon(_on_signals, mp, nursery.cancel_scope)
                _tune_kernel(mp)
                log.info("mounted %s at %s (pid %d; %s)", session.description, mp,
                         os.getpid(), "single writer: write-back caching"
                         if policy.writeback else "several writers: close-to-open")
                task_status.started(mp)
                await pyfuse3.main()
            finally:
                with trio.CancelScope(shield=True):
                    await _final_sync(ops)
                    pyfuse3.close(unmount=True)
                    log.info("unmounted %s", mp)
            nursery.cancel_scope.cancel()


async def _watch_view(session, ns: Namespace) -> None:
    """Adopt newer views while mounted (a writer added or removed)."""
    while True:
        await trio.sleep(VIEW_POLL)
        try:
            v = await session.views()
            if v is not None:
                await ns.update_view(v)
                log.info("volume view version %d adopted: %d active writers", v.version,
                         len(v.active_ids()))
        except StorageError as e:
            log.warning("newer view not adopted: %s", e)


async def _final_sync(ops: P2pfsOperations) -> None:
    with trio.move_on_after(FINAL_SYNC_TIMEOUT) as scope:
        try:
            await ops.shutdown()
        except Exception as e:  # noqa: BLE001 - logged; unmounting must go on
            errno_of(e, "final sync at unmount")
    if scope.cancelled_caught:
        log.error("the final sync did not finish in %.0f s (storage unreachable?): changes "
                  "made since the last close or fsync are lost", FINAL_SYNC_TIMEOUT)


# --------------------------------------------------------------------------
# Entry points


def mount_local(volume_dir: str | os.PathLike, mountpoint: str | os.PathLike, *,
                create: bool = False, foreground: bool = True,
                debug: bool = False) -> int:
    """Mount the single-node volume in ``volume_dir`` at ``mountpoint``.

    ``create``: make the volume first if ``volume_dir`` holds none.
    ``foreground``: serve in this process until unmounted, then return 0.
    Otherwise start ``python -m p2pfs.mount`` detached (its log goes to
    ``volume_dir/mount.log``), wait until the mount is there and return the
    server's pid. Raises MountError or BackendError with a clear message."""
    if create and not is_local_volume(volume_dir):
        mkfs_local(volume_dir)
    if foreground:
        trio.run(lambda: serve(LocalBackend(volume_dir), mountpoint, debug=debug))
        return 0
    mp = check_mountpoint(mountpoint)
    LocalBackend(volume_dir)._read_format()  # fail here, not in the child, if not a volume
    logf = Path(volume_dir) / "mount.log"
    argv = [sys.executable, "-m", "p2pfs.mount", str(volume_dir), str(mp)]
    if debug:
        argv.append("--debug")
    with open(logf, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    deadline = time.monotonic() + MOUNT_WAIT
    while not is_live(mp):
        if proc.poll() is not None:
            tail = logf.read_text(errors="replace")[-800:].strip()
            raise MountError(f"the mount process exited with code {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise MountError(f"{mp} was not mounted after {MOUNT_WAIT:.0f} s; see {logf}")
        time.sleep(0.02)
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    """``python -m p2pfs.mount VOLUME_DIR MOUNTPOINT [--create] [--debug]``:
    serve a single-node volume in the foreground. Exit codes as ``p2pfs``:
    0 unmounted cleanly, 1 failed (one line says why), 2 usage."""
    p = argparse.ArgumentParser(prog="python -m p2pfs.mount",
                                description="Mount a single-node p2pfs volume (foreground).")
    p.add_argument("volume_dir", help="directory of the volume (see p2pfs.backend)")
    p.add_argument("mountpoint", help="an empty directory")
    p.add_argument("--create", action="store_true", help="create the volume if missing")
    p.add_argument("--debug", action="store_true", help="log every FUSE request")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    args = p.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    try:
        return mount_local(args.volume_dir, args.mountpoint, create=args.create,
                           foreground=True, debug=args.debug)
    except (MountError, BackendError) as e:
        print(f"p2pfs mount: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the mount was up (afterwards SIGINT unmounts)
        print("p2pfs mount: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
