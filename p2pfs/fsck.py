"""``p2pfs fsck VOLUME [--repair] [--json] [--quick]``: check a volume and
repair what can be repaired (the checks are ``storage.fsck``, the repairs
``storage.fsck_repair``; this module opens the volume for them, keeps the
quarantine list, shows progress and prints the report).

Network volumes are checked through a client node of their own (an
ephemeral NodeID, no volume lock), so fsck runs beside a mount. Two repairs
write as this writer and need the volume unmounted (the lock): certifying
its newest head (its mount does that itself) and rebuilding its snapshot;
with the volume mounted they are reported as not done. A single-node volume
is one LMDB store that only one process may open: fsck takes the lock and
refuses while the volume is mounted.

The quarantine list is ``quarantine.json`` in the volume directory (written
atomically, only by ``--repair``). Exit codes (``EXIT_*``): 0 clean, 1 every
problem found was repaired or quarantined, 2 problems are left, 4 the volume
could not be checked (not a volume, mounted single-node volume, no network).
Progress goes to stderr, the report to stdout (``--json``: one JSON object).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio

from storage.errors import StorageError
from storage.fsck import BoardHeads, Quarantine, Report, VolumeAccess, check
from storage.fsck_blocks import NetHolders, StoreHolders
from storage.fsck_repair import RepairHooks, repair
from storage.fsck_ring import RingHeads, put_newest
from storage.localstore import LocalHeadBoard
from storage.namespace import Namespace
from storage.ring_errors import RingError
from storage.ringboard import publish_view

from .backend import BackendError, LocalBackend, VolumeBusy, _atomic_write
from .cli import unwrap_group
from .netbackend import NetworkBackend

EXIT_CLEAN, EXIT_REPAIRED, EXIT_LEFT, EXIT_CANNOT = 0, 1, 2, 4
QUARANTINE_FILE = "quarantine.json"
CERTIFY_WAIT = 60.0


class FsckError(BackendError):
    """The volume could not be checked at all (exit code 4)."""


class ProgressLine:
    """Progress on stderr: one rewritten line on a terminal, else a line per
    phase and at most one a second."""

    def __init__(self, stream=None, *, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.phase = None
        self.last = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        new = phase != self.phase
        if not (new or done >= total or now - self.last >= (0.1 if self.tty else 1.0)):
            return
        self.last = now
        pct = f" {100 * done // total:3d}%" if total else ""
        text = f"fsck: {phase}: {done}/{total}{pct}"
        if self.tty:
            if new and self.phase is not None:
                self.stream.write("\n")
            self.stream.write("\r" + text.ljust(60))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.phase = phase

    def done(self) -> None:
        if self.enabled and self.tty and self.phase is not None:
            self.stream.write("\n")
            self.stream.flush()


def load_quarantine(volume_dir: Path) -> Quarantine:
    path = Path(volume_dir) / QUARANTINE_FILE
    try:
        return Quarantine.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return Quarantine()
    except (OSError, ValueError) as e:
        raise FsckError(f"{path} is unreadable ({e}); move it away to start a new list") from None


def save_quarantine(volume_dir: Path, q: Quarantine) -> None:
    _atomic_write(Path(volume_dir) / QUARANTINE_FILE,
                  json.dumps(q.to_json(), indent=1).encode() + b"\n", mode=0o600)


def _kind(volume_dir: Path) -> str:
    try:
        fmt = json.loads((Path(volume_dir) / "FORMAT").read_text())
    except FileNotFoundError:
        raise FsckError(f"{volume_dir} is not a p2pfs volume (no FORMAT file)") from None
    except (OSError, ValueError) as e:
        raise FsckError(f"{volume_dir}/FORMAT is unreadable: {e}") from None
    return fmt.get("kind", "?") if isinstance(fmt, dict) else "?"


async def fsck(volume_dir, *, do_repair: bool = False, verify_data: bool = True,
               progress=None) -> Report:
    """Check (and with ``do_repair`` repair) the volume in ``volume_dir``."""
    d = Path(volume_dir)
    kind = _kind(d)
    quarantine = load_quarantine(d)
    progress = progress or (lambda *a: None)
    try:
        if kind == "network":
            report = await _network(d, quarantine, do_repair, verify_data, progress)
        elif kind == "single-node":
            report = await _single(d, quarantine, do_repair, verify_data, progress)
        else:
            raise FsckError(f"{d}: unknown volume kind {kind!r}")
    except BaseExceptionGroup as eg:      # from the nurseries of the client node
        inner = unwrap_group(eg)
        if inner is eg or not isinstance(inner, (BackendError, StorageError, RingError)):
            raise
        raise FsckError(f"cannot check {d}: {inner}") from None
    except VolumeBusy as e:
        raise FsckError(f"{e} (a single-node volume is checked unmounted)") from None
    except (BackendError, StorageError, RingError) as e:
        if isinstance(e, FsckError):
            raise
        raise FsckError(f"cannot check {d}: {e}") from None
    return report


async def _finish(d: Path, vol: VolumeAccess, report: Report, quarantine: Quarantine,
                  hooks: RepairHooks, progress) -> None:
    t0 = time.monotonic()
    progress("repair", 0, 1)
    doomed = await repair(vol, report, hooks, progress=progress)
    if quarantine.add(doomed, time.time()):
        save_quarantine(d, quarantine)
    progress("repair", 1, 1)
    report.elapsed += time.monotonic() - t0


async def _network(d: Path, quarantine: Quarantine, do_repair: bool, verify_data: bool,
                   progress) -> Report:
    backend = NetworkBackend(d)
    async with backend.connect() as conn:
        key = conn.key()
        blocks = conn.sn.blocks(key, r=conn.r)
        raw = conn.sn.blocks(bytes(32), r=conn.r)   # views and heads: stored unsealed

        async def locate(g: bytes):
            f = await raw.fetch(g)
            return f.data, f.source

        holders = NetHolders(conn.transport, conn.sn.placement, locate, r=conn.r)
        own_board = None
        if conn.ring is not None:
            heads = RingHeads(conn.ring, conn.get_raw)
            own_board = LocalHeadBoard(d / "heads")
        else:
            heads = BoardHeads(LocalHeadBoard(d / "heads"))
        vol = VolumeAccess(f"{conn.view.name} ({d})", conn.view, conn.identity, blocks,
                           holders, heads, own_board)
        try:
            report = await check(vol, verify_data=verify_data, progress=progress,
                                 quarantine=quarantine)
        finally:
            # attach() (below) opens the same LMDB: one environment per process.
            (own_board or heads.board).close()
        if not do_repair:
            return report

        async def save_view(view):
            conn.save_view(view)

        async def publish(view):
            if conn.ring is None or conn.identity.public_key != view.owner:
                return "only the volume's owner publishes its view"
            try:
                await publish_view(conn.ring, conn.put_raw, view)
            except (RingError, StorageError) as e:
                return str(e)
            return None

        async def put_certs(findings):
            return await put_newest(conn.ring, findings)

        hooks = RepairHooks(put_certs=put_certs if conn.ring else None, save_view=save_view,
                            publish_view=publish, certify=lambda: _certify(backend),
                            rebuild_snapshot=lambda: _rebuild_attached(backend))
        await _finish(d, vol, report, quarantine, hooks, progress)
        return report


async def _wait_certified(board) -> str | None:
    with trio.move_on_after(CERTIFY_WAIT):
        while getattr(board, "pending", False):
            await trio.sleep(0.1)
        return None
    return "the head is durable but the ring did not certify it in time (is the ring up?)"


async def _certify(backend: NetworkBackend) -> str | None:
    """Attach (the head board certifies the newest durable head on start)."""
    try:
        async with backend.attach() as s:
            return await _wait_certified(s.board)
    except VolumeBusy:
        return "the volume is mounted: its mount certifies its own head"
    except (BackendError, StorageError, RingError) as e:
        return str(e)


async def _rebuild(s) -> str | None:
    """A new snapshot of this writer from a replay of the logs (no snapshot
    is trusted for it), named in a new head."""
    if s.view.active_ids() and s.identity.id not in s.view.active_ids():
        return "this identity is not an active writer of the volume"
    ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board, use_snapshots=False,
                               snapshot_every=0)
    root = await ns.snapshot()
    if root is None:
        return ("other writers' records are still in flight (not a clean cut): run "
                "fsck --repair again later")
    return await _wait_certified(s.board)


async def _rebuild_attached(backend: NetworkBackend) -> str | None:
    try:
        async with backend.attach() as s:
            return await _rebuild(s)
    except VolumeBusy:
        return "the volume is mounted: unmount it and run fsck --repair again"
    except (BackendError, StorageError, RingError) as e:
        return str(e)


async def _single(d: Path, quarantine: Quarantine, do_repair: bool, verify_data: bool,
                  progress) -> Report:
    async with LocalBackend(d).attach() as s:
        vol = VolumeAccess(f"{s.view.name} ({d})", s.view, s.identity, s.blocks,
                           StoreHolders(s.blocks.store), BoardHeads(s.board))
        report = await check(vol, verify_data=verify_data, progress=progress,
                             quarantine=quarantine)
        if do_repair:
            async def rebuild():
                try:
                    return await _rebuild(s)
                except StorageError as e:
                    return str(e)

            await _finish(d, vol, report, quarantine, RepairHooks(rebuild_snapshot=rebuild),
                          progress)
        return report


# --------------------------------------------------------------------------
# Output


def format_report(report: Report, *, do_repair: bool) -> str:
    st = report.stats
    lines = [f"fsck of {report.volume}"]
    for p in report.problems:
        lines.append("  " + p.line())
    lines.append(
        f"checked {st.get('writers', 0)} writers, {st.get('records', 0)} records, "
        f"{st.get('snapshots', 0)} snapshots, {st.get('files', 0)} files, "
        f"{st.get('blocks', 0)} blocks ({st.get('copies_verified', 0)} copies verified) "
        f"in {report.elapsed:.1f} s")
    errors = [p for p in report.problems if p.severity == "error"]
    fixed = sum(1 for p in errors if p.status == "repaired")
    quar = sum(1 for p in errors if p.status == "quarantined")
    known = sum(1 for p in errors if p.status == "known")
    left = sum(1 for p in errors if p.open)
    warn = len(report.problems) - len(errors)
    if not errors or known == len(errors):
        lines.append("clean" + (f" ({known} known quarantined)" if known else "")
                     + (f" ({warn} warnings)" if warn else ""))
    else:
        lines.append(f"{len(errors)} problems: {fixed} repaired, {quar} quarantined, "
                     f"{left} left" + (f"; {warn} warnings" if warn else ""))
        if left and not do_repair and any(p.repair for p in errors if p.open):
            lines.append("run with --repair to repair what can be repaired")
    return "\n".join(lines)


def run(volume_dir: str, *, do_repair: bool, as_json: bool, verify_data: bool,
        quiet: bool) -> int:
    """The ``fsck`` command: print the report, return the exit code."""
    bar = ProgressLine(enabled=not quiet)
    try:
        report = trio.run(lambda: fsck(volume_dir, do_repair=do_repair,
                                       verify_data=verify_data, progress=bar))
    except FsckError as e:
        bar.done()
        if as_json:
            print(json.dumps({"volume": str(volume_dir), "error": str(e), "exit": EXIT_CANNOT}))
        print(f"p2pfs fsck: {e}", file=sys.stderr)
        return EXIT_CANNOT
    bar.done()
    if as_json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(format_report(report, do_repair=do_repair))
    return report.exit_code()
