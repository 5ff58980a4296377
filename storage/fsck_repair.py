"""Repairing what ``storage.fsck`` found (issue 9: restore missing replicas,
rebuild snapshots from logs, quarantine what cannot be trusted, never delete
user data that is still reachable; compare borg check --repair).

Each repair is one of:

* ``restore``: copy the verified bytes of a block from a good holder to the
  placement holders that lack it (``Holders.restore``);
* ``put-cert``: leave the newest valid certificate with a ring member that
  hands out an older one (``fsck_ring.put_newest``);
* ``save-view`` / ``publish-view``: adopt the ring's newer view here, or
  (the owner) publish the newer view held here to the ring;
* ``certify``: let this writer's head board certify its newest durable head
  (the backend attaches the volume: its board certifies on start);
* ``rebuild``: write a new snapshot of this writer from a replay of the logs
  (never from a snapshot: a bad one must not be reused) and publish a head
  naming it; the bad snapshot is quarantined;
* ``quarantine``: record the thing as untrusted (the caller keeps the list:
  ``p2pfs.fsck``), so later checks skip it (snapshots) or report it as known
  (a faulty ring member or holder), and nothing uses it again. Nothing is
  deleted: a quarantined snapshot's blocks stay where they are.

Order: data first (copies), then certificates, the view, heads, snapshots,
and the quarantine list last. Crash safety: every step is idempotent and
each one either completes or leaves the volume as it was (a store, a
certificate, a head are each atomic where they land; a snapshot killed
half-written is orphan blocks no head names), so a repair killed at any
point (kill -9) is simply run again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from .errors import StorageError
from .fsck import Problem, Progress, Report, VolumeAccess, _no_progress

log = logging.getLogger(__name__)

RESTORE_KINDS = ("replica-missing", "replica-corrupt", "replica-tombstoned", "block-misplaced")
QUARANTINE_KINDS = ("cert-bad", "replica-forged")


@dataclass
class RepairHooks:
    """What repairs need beyond the check's inputs; None where a backend
    cannot do it. Each returns None on success or a reason it could not."""

    put_certs: Callable[[object], Awaitable[dict]] | None = None       # RingFindings -> took
    save_view: Callable[[object], Awaitable[str | None]] | None = None
    publish_view: Callable[[object], Awaitable[str | None]] | None = None
    certify: Callable[[], Awaitable[str | None]] | None = None
    rebuild_snapshot: Callable[[], Awaitable[str | None]] | None = None


async def repair(vol: VolumeAccess, report: Report, hooks: RepairHooks, *,
                 progress: Progress = _no_progress) -> list[Problem]:
    """Act on every problem a repair can do something about; set each
    one's status. Returns the problems to quarantine (the caller records
    them)."""
    await _restore(vol, report, progress)
    await _certificates(report, hooks)
    await _view(report, hooks)
    await _heads(report, hooks)
    await _snapshots(vol, report, hooks)
    doomed = [p for p in report.problems if p.status == "found" and
              (p.kind in QUARANTINE_KINDS or p.kind == "snapshot-bad")]
    for p in doomed:
        p.status = "quarantined"
    _lost_with_quarantined_snapshots(report)
    return [p for p in report.problems if p.status == "quarantined"]


def _open(report: Report, *kinds: str) -> list[Problem]:
    return [p for p in report.problems if p.kind in kinds and p.status == "found"]


async def _restore(vol: VolumeAccess, report: Report, progress: Progress) -> None:
    todo = _open(report, *RESTORE_KINDS)
    if not todo:
        return
    gs = {g for p in todo for g in p.objects}
    states = {g: report.blocks[g] for g in gs if g in report.blocks}
    try:
        stored = await vol.holders.restore(states, progress)
    except StorageError as e:
        for p in todo:
            p.status, p.note = "failed", str(e)
        return
    for p in todo:
        if p.kind == "block-misplaced":
            ok = all(states[g].lacking and states[g].lacking <= stored.get(g, set())
                     for g in p.objects)
        else:
            ok = all(p.where in stored.get(g, set()) for g in p.objects)
        if ok:
            p.status = "repaired"
            p.note = "copies restored from a verified copy"
        else:
            n = sum(1 for g in p.objects if p.where in stored.get(g, set()))
            p.status, p.note = "failed", f"{n} of {len(p.objects)} copies restored"


async def _certificates(report: Report, hooks: RepairHooks) -> None:
    todo = _open(report, "cert-stale")
    if not todo:
        return
    if hooks.put_certs is None or report.ring is None:
        for p in todo:
            p.status, p.note = "failed", "no ring client"
        return
    took = await hooks.put_certs(report.ring)
    for p in todo:
        if set(p.objects) <= set(took.get(p.where, ())):
            p.status, p.note = "repaired", "the member took the newest certificate"
        else:
            p.status, p.note = "failed", "the member did not take the newest certificate"


async def _run_hook(p: Problem, hook, *args, done: str) -> None:
    if hook is None:
        p.status, p.note = "failed", "not possible for this volume"
        return
    why = await hook(*args)
    if why is None:
        p.status, p.note = "repaired", done
    else:
        p.status, p.note = "failed", why


async def _view(report: Report, hooks: RepairHooks) -> None:
    for p in _open(report, "view-local-stale"):
        await _run_hook(p, hooks.save_view, p.hint["view"], done="the ring's view saved here")
    for p in _open(report, "view-ring-stale"):
        if "view" not in p.hint:
            await _run_hook(p, hooks.publish_view, report.view, done="view published")
        else:
            await _run_hook(p, hooks.publish_view, p.hint["view"], done="view published")


async def _heads(report: Report, hooks: RepairHooks) -> None:
    for p in _open(report, "head-uncertified"):
        await _run_hook(p, hooks.certify, done="the head is certified")


async def _snapshots(vol: VolumeAccess, report: Report, hooks: RepairHooks) -> None:
    me = vol.identity.id
    ours = [p for p in _open(report, "snapshot-bad") if me in p.hint.get("head_of", ())]
    if not ours:
        return
    if hooks.rebuild_snapshot is None:
        why = "this volume cannot write a snapshot here"
    else:
        why = await hooks.rebuild_snapshot()
    for p in ours:
        if why is None:
            # The new snapshot replaces it in this writer's head; the bad one
            # is quarantined (its blocks are kept, nothing uses it).
            p.status, p.note = "quarantined", "rebuilt from the logs; the bad one quarantined"
        else:
            p.status, p.note = "failed", f"snapshot not rebuilt: {why}"


def _lost_with_quarantined_snapshots(report: Report) -> None:
    """Blocks lost or damaged that only quarantined snapshots use are
    quarantined with them (later checks do not read those snapshots)."""
    gone = {g for p in report.problems if p.kind == "snapshot-bad"
            and p.status == "quarantined" for g in p.objects}
    if not gone:
        return
    refs = report.refs
    for p in report.problems:
        if p.status != "found" and p.status != "failed":
            continue
        if not p.kind.startswith(("block-", "replica-")):
            continue
        if all(refs.get(g) and all(r.what == "snapshot" and r.root in gone for r in refs[g])
               for g in p.objects):
            p.status, p.note = "quarantined", "used only by quarantined snapshots"
