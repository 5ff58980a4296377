"""Checking a volume: everything reachable from its view, verified (DESIGN.md
"What must always hold": nothing is trusted that was not checked; issue 9;
compare S3QL's fsck.s3ql and borg check).

What is checked, in this order (each step trusts only what the earlier ones
verified):

1. **Certificates** (ring volumes, ``storage.fsck_ring``): every ring member
   is asked, one by one, for the newest certificate of the view object and
   of each writer's log-head object. Each must verify (2f+1 valid member
   signatures of this ring and epoch); members must agree (no two valid
   certificates for one sequence number, sequence chains that link through
   ``prev``); a member behind the newest is stale (a rolled-back log-head as
   that member hands it out).
2. **The view and the log-heads**: the certified view block hashes to its
   VGUID and verifies under the owner's key, and is not older than the view
   held here; each certified head block hashes to its VGUID, decodes, and
   verifies under its writer's key for this volume. This writer's own
   durable head (``heads/``) must not fork from the certified one, and is
   certified when newer.
3. **Logs** (``storage.fsck_logs``): every writer's log from its head back
   to its first record: strict decoding, one volume and writer, consecutive
   seqs, vectors that never go back, the End record first.
4. **Snapshots**: every snapshot a head, a SnapshotMark record or another
   snapshot names is read in full (``storage.snapshots`` checks its
   structure) and compared with a replay of the logs up to what it covers:
   a snapshot that does not equal the file system its records compute is
   not trusted.
5. **Blocks** (``storage.fsck_blocks``): every block any of the above
   references (log blocks, file data of every version, snapshot pages, head
   and view blocks) must be held by its r placement holders, each copy's
   bytes hashing to the BGUID.

Every :class:`Problem` names what it affects: file paths (in the newest
version), versions (the records and snapshots concerned) and nodes.

A check changes nothing: it only reads (a holder that finds a copy corrupt
while serving fsck moves it to its quarantine, as it does for any reader:
``storage.blockstore`` invariant I1). Repairs are ``storage.fsck_repair``.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Callable

from overlay.wire.ids import Identity, short

from .blockapi import BlockAccess
from .fsck_blocks import BlockState, Holders
from .fsck_logs import LogCheck
from .fsck_refs import LiveSet, Ref
from .logs import HeadBoard, LogError, LogHead, decode_head
from .timenames import time_text
from .volume import View

# Severities: an error makes the volume unclean (exit 2 unless repaired or
# quarantined); a warning is reported and does not.
ERROR, WARNING = "error", "warning"

# Problem kinds: (what it means, how --repair handles it). The repair names
# are those of storage.fsck_repair; None: nothing fsck can do.
KINDS: dict[str, tuple[str, str | None]] = {
    "member-down": ("a ring member did not answer", None),
    "cert-bad": ("a ring member hands out a certificate that does not verify (forged "
                 "or damaged)", "quarantine"),
    "cert-stale": ("a ring member hands out an older certificate than the newest valid "
                   "one (a rolled-back version)", "put-cert"),
    "cert-fork": ("two valid certificates for one sequence number", None),
    "cert-chain": ("certificates whose sequence chain does not link", None),
    "view-bad": ("the ring's view does not verify or is not this volume's", None),
    "view-local-stale": ("the view held here is older than the ring's", "save-view"),
    "view-ring-stale": ("the ring's view is older than the one held here, or missing",
                        "publish-view"),
    "head-bad": ("a certified log-head is missing, malformed or not signed by its writer",
                 None),
    "head-uncertified": ("this writer's newest log-head is not certified by the ring yet",
                         "certify"),
    "head-fork": ("this writer's own head and the certified one differ at the same point",
                  None),
    "log-broken": ("a writer's log cannot be read back to its start", None),
    "snapshot-bad": ("a snapshot is unreadable, malformed, or differs from the file "
                     "system its records compute", "rebuild-or-quarantine"),
    "replica-missing": ("a placement holder lacks its copy of a block", "restore"),
    "replica-corrupt": ("a holder's copy failed verification (quarantined by the holder)",
                        "restore"),
    "replica-tombstoned": ("a holder tombstoned (collected) a block that is still live",
                           "restore"),
    "replica-forged": ("a holder served bytes that do not hash to the block", "quarantine"),
    "block-misplaced": ("a block is held only outside its placement holders", "restore"),
    "block-lost": ("no verified copy of a block exists", None),
    "holder-unreachable": ("a placement holder did not answer", None),
}


@dataclass
class Problem:
    """One thing found wrong. ``objects`` are the ids concerned (BGUIDs,
    AGUIDs, writer ids), ``where`` the node at fault (a holder or ring
    member) if any, ``affects`` what a user would lose or see changed
    (paths, versions, writers). ``status``: "found", then "repaired",
    "quarantined" or "failed" (with ``note`` saying why); "known" when the
    quarantine list already holds it."""

    kind: str
    detail: str
    objects: list[bytes] = field(default_factory=list)
    where: bytes | None = None
    affects: list[str] = field(default_factory=list)
    severity: str = ERROR
    status: str = "found"
    note: str = ""
    hint: dict = field(default_factory=dict, repr=False)   # what a repair needs to know

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}")

    @property
    def repair(self) -> str | None:
        """How --repair handles it (``KINDS``)."""
        return KINDS[self.kind][1]

    @property
    def key(self) -> str:
        """A stable name for this problem (quarantine entries match on it)."""
        objs = ",".join(sorted(o.hex() for o in self.objects))
        return f"{self.kind}:{self.where.hex() if self.where else '-'}:{objs}"

    @property
    def open(self) -> bool:
        """Still counts against a clean volume."""
        return self.severity == ERROR and self.status in ("found", "failed")

    def to_json(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "status": self.status,
                "detail": self.detail, "objects": [o.hex() for o in self.objects],
                "where": self.where.hex() if self.where else None,
                "affects": list(self.affects), "repair": self.repair, "note": self.note}

    def line(self) -> str:
        where = f" at {short(self.where)}" if self.where else ""
        objs = ""
        if self.objects:
            objs = " " + ", ".join(short(o) for o in self.objects[:4])
            if len(self.objects) > 4:
                objs += f" (+{len(self.objects) - 4})"
        aff = ""
        if self.affects:
            aff = "; affects " + ", ".join(self.affects[:6])
            if len(self.affects) > 6:
                aff += f" and {len(self.affects) - 6} more"
        state = "" if self.status == "found" else f" [{self.status}{': ' + self.note if self.note else ''}]"
        return f"{self.severity}: {self.kind}{where}{objs}: {self.detail}{aff}{state}"


@dataclass
class Report:
    """What a check found, and what a repair needs to act on it."""

    volume: str
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    # Context for repairs (not serialised):
    blocks: dict[bytes, BlockState] = field(default_factory=dict, repr=False)
    ring: object | None = field(default=None, repr=False)        # fsck_ring.RingFindings
    view: View | None = field(default=None, repr=False)
    refs: dict = field(default_factory=dict, repr=False)     # BGUID -> [fsck_refs.Ref]

    def add(self, p: Problem) -> Problem:
        self.problems.append(p)
        return p

    @property
    def clean(self) -> bool:
        return not any(p.open for p in self.problems)

    @property
    def repaired(self) -> bool:
        return any(p.status in ("repaired", "quarantined") for p in self.problems)

    def exit_code(self) -> int:
        """0 clean, 1 everything found was repaired, 2 problems left."""
        if not self.clean:
            return 2
        return 1 if self.repaired else 0

    def to_json(self) -> dict:
        return {"volume": self.volume, "clean": self.clean, "exit": self.exit_code(),
                "elapsed": round(self.elapsed, 3), "stats": dict(self.stats),
                "problems": [p.to_json() for p in self.problems]}


Progress = Callable[[str, int, int], None]     # (phase, done, total)


@dataclass
class Quarantine:
    """What repairs declared untrusted (``storage.fsck_repair``): problems by
    key, each with what it was and when. Later checks skip quarantined
    snapshots and report the other entries as known (not open). The caller
    stores it (``p2pfs.fsck``: ``quarantine.json`` in the volume directory)."""

    entries: dict[str, dict] = field(default_factory=dict)

    @property
    def snapshots(self) -> set[bytes]:
        return {bytes.fromhex(o) for e in self.entries.values()
                if e["kind"] == "snapshot-bad" for o in e["objects"]}

    def add(self, problems: list[Problem], now: float) -> int:
        n = 0
        for p in problems:
            if p.key not in self.entries:
                self.entries[p.key] = {"kind": p.kind, "detail": p.detail,
                                       "objects": [o.hex() for o in p.objects],
                                       "where": p.where.hex() if p.where else None,
                                       "since": round(now, 3)}
                n += 1
        return n

    def to_json(self) -> dict:
        return {"p2pfs-quarantine": 1, "entries": self.entries}

    @classmethod
    def from_json(cls, d) -> "Quarantine":
        if not isinstance(d, dict) or d.get("p2pfs-quarantine") != 1 or not isinstance(
                d.get("entries"), dict):
            raise ValueError("not a p2pfs quarantine list")
        for k, e in d["entries"].items():
            if not (isinstance(e, dict) and isinstance(e.get("objects"), list)
                    and e.get("kind") in KINDS):
                raise ValueError(f"bad quarantine entry {k!r}")
        return cls(dict(d["entries"]))


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


class HeadSource(abc.ABC):
    """Where the writers' current log-heads come from: the inner ring
    (``storage.fsck_ring.RingHeads``) or a head board (ringless volumes)."""

    @abc.abstractmethod
    async def check(self, view: View, report: Report, progress: Progress
                    ) -> tuple[View, dict[bytes, bytes], dict[bytes, str]]:
        """Check what stands behind the heads; return the view to use, the
        encoded head of each writer that has one, and raw blocks (BGUID ->
        label) that must be held like any other block."""


class BoardHeads(HeadSource):
    """Heads of a ringless volume: one board, trusted only as far as the
    writers' signatures go (checked by the caller)."""

    def __init__(self, board: HeadBoard):
        self.board = board

    async def check(self, view, report, progress):
        heads = await self.board.fetch([p.id for p in view.participants])
        return view, heads, {}


@dataclass
class VolumeAccess:
    """What fsck reads a volume through (``p2pfs.fsck`` builds one).
    ``blocks`` opens sealed blocks (any holder); ``holders`` surveys and
    restores copies per holder; ``own_board`` is this writer's durable
    board, compared with what the ring certified."""

    name: str
    view: View
    identity: Identity
    blocks: BlockAccess
    holders: Holders
    heads: HeadSource
    own_board: HeadBoard | None = None


async def check(vol: VolumeAccess, *, verify_data: bool = True,
                progress: Progress = _no_progress,
                quarantine: Quarantine | None = None) -> Report:
    """Run every check (module docstring); never changes the volume.
    Problems already in ``quarantine`` are reported as such, not open."""
    t0 = time.monotonic()
    quarantine = quarantine or Quarantine()
    report = Report(vol.name)
    progress("heads", 0, 1)
    view, raw_heads, raw_blocks = await vol.heads.check(vol.view, report, progress)
    report.view = view
    heads = _accept_heads(view, raw_heads, report)
    await _compare_own_head(vol, view, heads, report)

    logs = LogCheck(view, vol.blocks, progress=progress,
                    skip_snapshots=quarantine.snapshots)
    await logs.run(heads, report)
    live: LiveSet = logs.live
    for g, label in raw_blocks.items():
        live.add(g, None, Ref("raw", label))
    report.refs = live.refs

    progress("blocks", 0, len(live.refs))
    states = await vol.holders.survey(list(live.refs), verify=verify_data, progress=progress)
    report.blocks = states
    _block_problems(states, live, logs, report)
    report.stats.update(logs.stats)
    report.stats["blocks"] = len(live.refs)
    report.stats["copies_verified"] = sum(len(s.good) for s in states.values())
    for p in report.problems:
        e = quarantine.entries.get(p.key)
        if e is not None:
            p.status = "known"
            p.note = f"in the quarantine list since {time_text(int(e['since'] * 1e9))}"
    report.elapsed = time.monotonic() - t0
    return report


def _accept_heads(view: View, raw: dict[bytes, bytes], report: Report) -> dict[bytes, LogHead]:
    out = {}
    for p in view.participants:
        r = raw.get(p.id)
        if r is None:
            continue
        try:
            head = decode_head(r)
            head.verify(p.public_key, view.volume)
        except LogError as e:
            report.add(Problem("head-bad", f"log-head of writer {short(p.id)}: {e}",
                               [p.id], affects=[f"writer {short(p.id)}: its whole log"]))
            continue
        out[p.id] = head
    report.stats["writers"] = len(view.participants)
    report.stats["heads"] = len(out)
    return out


async def _compare_own_head(vol: VolumeAccess, view: View, heads: dict[bytes, LogHead],
                            report: Report) -> None:
    """This writer's durable head against the certified one (ring volumes)."""
    if vol.own_board is None:
        return
    me = vol.identity.id
    raw = (await vol.own_board.fetch([me])).get(me)
    if raw is None:
        return
    try:
        own = decode_head(raw)
        own.verify(vol.identity.public_key, view.volume)
    except LogError as e:
        report.add(Problem("head-bad", f"this writer's own durable head: {e}", [me]))
        return
    cert = heads.get(me)
    if cert is None or own.n > cert.n:
        report.add(Problem(
            "head-uncertified",
            f"this writer's head n={own.n} (seq {own.seq}) is durable here but the ring "
            f"certifies {'none' if cert is None else f'n={cert.n}'}: other writers do not "
            f"see its newest records", [me],
            affects=[f"writer {short(me)}: records after seq "
                     f"{0 if cert is None else cert.seq}"]))
        heads[me] = own          # what this writer has written is what we check
    elif own.n == cert.n and own != cert:
        report.add(Problem("head-fork", f"this writer's head n={own.n} differs from the "
                           f"certified head with the same counter", [me],
                           affects=[f"writer {short(me)}: its whole log"]))


def _block_problems(states: dict[bytes, BlockState], live: LiveSet, logs: LogCheck,
                    report: Report) -> None:
    """Per-holder findings, one problem per (kind, node), naming the blocks."""
    groups: dict[tuple[str, bytes | None], list[bytes]] = {}
    unreachable: set[bytes] = set()
    for g, st in states.items():
        unreachable |= st.unreachable
        # A lost or misplaced block is a problem of its own (what it affects
        # is precise); copies missing on a holder are grouped by holder.
        if not st.good and st.elsewhere is None:
            groups[("block-lost", g)] = [g]
            continue
        if not st.good:
            groups[("block-misplaced", g)] = [g]
            continue
        for kind, ids in (("replica-missing", st.missing), ("replica-corrupt", st.corrupt),
                          ("replica-tombstoned", st.tombstoned),
                          ("replica-forged", st.forged)):
            for nid in ids:
                groups.setdefault((kind, nid), []).append(g)
    for nid in sorted(unreachable):
        report.add(Problem("holder-unreachable", "did not answer; its blocks were checked "
                           "on the next placement candidates", where=nid, severity=WARNING))
    texts = {
        "block-lost": "no verified copy found on any holder",
        "block-misplaced": "held only outside the placement holders",
        "replica-missing": "this placement holder lacks its copy",
        "replica-corrupt": "this holder's copy failed verification (the holder "
                           "quarantined it)",
        "replica-tombstoned": "this holder tombstoned these live blocks",
        "replica-forged": "this holder served bytes that do not hash to the block",
    }
    for (kind, nid), gs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or b"")):
        gs.sort()
        if kind.startswith("block-"):
            nid = None
        report.add(Problem(kind, f"{len(gs)} block{'s' if len(gs) != 1 else ''}: {texts[kind]}",
                           gs, where=nid, affects=logs.affects(gs)))
