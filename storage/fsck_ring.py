"""Checking what the inner ring certifies for a volume: the view and every
writer's log-head, member by member (OceanStore/Pond inner ring, FAST 2003;
DESIGN.md "storage/objects": a certificate is valid with 2f+1 distinct
member signatures; "storage/logs": no storage node can roll a log back or
show two readers two histories; ``storage.ringboard``).

A reader (``RingClient.latest``) asks every member, keeps the newest
certificate that verifies and ignores the rest, so one lying or lagging
member cannot mislead it. fsck asks the same question of each member *on
its own* and reports what each one hands out:

* a certificate that does not verify against the ring descriptor (too few
  or invalid signatures, another ring or epoch, another object): the member
  is faulty or its store damaged (``cert-bad``; quarantined: readers already
  ignore it, and only replacing the member mends it);
* a valid certificate older than the newest valid one, or none while
  others have one: the member hands out a rolled-back version
  (``cert-stale``; repaired by leaving the newest certificate with it,
  ``ring.put_cert``, which a member keeps only if it is newer);
* two valid certificates with one sequence number and different versions
  (``cert-fork``: more than f members signed both, which the ring's
  assumptions exclude) and sequence chains that do not link: a certificate
  of seq 1 with a predecessor, of seq > 1 without one, of seq s+1 whose
  ``prev`` is not the version certified at seq s (``cert-chain``);
* members that do not answer (``member-down``: a warning while 2f+1 do).

Then the newest view must hash to its VGUID, verify under the owner's key,
be this volume's and not be older than the view held here; each newest head
block must hash to its VGUID (its contents are checked by ``storage.fsck``).
The view and head blocks are returned, with labels, so that their copies
are surveyed like every other block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError, RemoteError

from .certificate import Certificate, verify
from .errors import StorageError
from .fsck import ERROR, WARNING, HeadSource, Problem, Report
from .logs import LogError, decode_head
from .ring import LATEST, PUT_CERT
from .ring_errors import BadCertificate, RingError
from .ringboard import head_aguid, raw_bguid, view_aguid
from .volume import BadView, View

DEFAULT_TIMEOUT = 5.0


@dataclass
class RingFindings:
    """What the members said, kept for repairs."""

    newest: dict[bytes, Certificate] = field(default_factory=dict)    # aguid -> cert
    stale: dict[bytes, list[bytes]] = field(default_factory=dict)     # member -> aguids
    labels: dict[bytes, str] = field(default_factory=dict)            # aguid -> text
    up: set[bytes] = field(default_factory=set)


class RingHeads(HeadSource):
    """Heads and view of a ring volume, checked member by member (module
    docstring). ``client``: a ``RingClient`` of the volume's ring;
    ``get_raw``: verified raw blocks by BGUID."""

    def __init__(self, client, get_raw, *, timeout: float = DEFAULT_TIMEOUT):
        self.client = client
        self.get_raw = get_raw
        self.timeout = timeout

    @property
    def ring(self):
        return self.client.ring

    async def check(self, view, report: Report, progress):
        findings = RingFindings()
        report.ring = findings
        try:
            await self.client.refresh_ring()    # a reconfigured ring signs with a new epoch
        except (RingError, PeerError, StorageError):
            pass
        ring = self.ring
        progress("ring", 0, 2)
        vag = view_aguid(view.owner, view.volume)
        findings.labels[vag] = "the volume's view"
        answers = await self._probe([vag], findings)
        self._down_members(answers, report)
        view, raw_blocks = await self._check_view(view, vag, answers, findings, report)
        progress("ring", 1, 2)
        aguids = {}
        for p in view.participants:
            a = head_aguid(p.public_key, view.volume)
            aguids[a] = p
            findings.labels[a] = f"log-head of writer {short(p.id)}"
        answers = await self._probe(list(aguids), findings)
        heads: dict[bytes, bytes] = {}
        for a, p in aguids.items():
            cert = self._judge(a, answers, findings, report)
            if cert is None:
                continue
            raw_blocks[cert.vguid] = f"log-head of writer {short(p.id)} (seq {cert.seq})"
            try:
                raw = await self.get_raw(cert.vguid)
                if raw_bguid(raw) != cert.vguid:
                    raise StorageError("the block does not hash to the certified VGUID")
            except (StorageError, PeerError) as e:
                report.add(Problem("head-bad", f"the certified log-head of writer "
                                   f"{short(p.id)} (seq {cert.seq}) cannot be read: {e}",
                                   [p.id], affects=[f"writer {short(p.id)}: readers keep the "
                                                    f"head they had, or none"]))
                continue
            heads[p.id] = raw
            await self._check_prev_head(a, cert, raw, p, findings, report)
        progress("ring", 2, 2)
        report.stats["ring_members"] = ring.n
        report.stats["ring_members_up"] = len(findings.up)
        return view, heads, raw_blocks

    # ---- asking the members --------------------------------------------------

    async def _probe(self, aguids: list[bytes], findings: RingFindings
                     ) -> dict[bytes, dict[bytes, object]]:
        """member id -> {aguid: Certificate | BadCertificate | None}, or
        member id -> PeerError/RemoteError if it did not answer."""
        out: dict[bytes, object] = {}
        ring = self.ring

        async def ask(m):
            got: dict[bytes, object] = {}
            peer = Peer(m.id, m.addr)
            for a in aguids:
                try:
                    r = await self.client.transport.request(peer, LATEST, {"aguid": a},
                                                            timeout=self.timeout)
                except (PeerError, RemoteError) as e:
                    out[m.id] = e
                    return
                if r["cert"] is None:
                    got[a] = None
                    continue
                try:
                    c = Certificate.decode(r["cert"])
                    verify(c, ring)
                    if c.aguid != a:
                        raise BadCertificate(BadCertificate.MISMATCH,
                                             f"a certificate of another object "
                                             f"({short(c.aguid)})")
                    got[a] = c
                except BadCertificate as e:
                    got[a] = e
            out[m.id] = got
            findings.up.add(m.id)

        async with trio.open_nursery() as n:
            for m in ring.members:
                n.start_soon(ask, m)
        return out

    def _down_members(self, answers, report: Report) -> None:
        ring = self.ring
        up = sum(1 for v in answers.values() if isinstance(v, dict))
        for m in ring.members:
            a = answers.get(m.id)
            if isinstance(a, dict):
                continue
            report.add(Problem("member-down", f"ring member at {m.addr} did not answer: {a}",
                               where=m.id, severity=WARNING if up >= ring.quorum else ERROR,
                               affects=[f"the ring tolerates {ring.f} faulty members; "
                                        f"{ring.n - up} do not answer"]))

    def _judge(self, a: bytes, answers, findings: RingFindings, report: Report
               ) -> Certificate | None:
        """The newest valid certificate of ``a``; problems for the members
        that disagree with it."""
        label = findings.labels.get(a, short(a))
        valid: dict[bytes, Certificate] = {}
        for mid, got in answers.items():
            if not isinstance(got, dict):
                continue
            c = got.get(a)
            if isinstance(c, BadCertificate):
                self._add_member_problem(report, "cert-bad", mid, a, label,
                                         f"hands out a certificate that does not verify: {c}")
            elif c is not None:
                valid[mid] = c
        if not valid:
            return None
        by_seq: dict[int, dict[bytes, Certificate]] = {}
        for mid, c in valid.items():
            by_seq.setdefault(c.seq, {})[c.vguid] = c
        for seq, vs in by_seq.items():
            if len(vs) > 1:
                report.add(Problem("cert-fork", f"{label}: {len(vs)} different versions "
                                   f"certified at seq {seq}", [a],
                                   affects=[label, "more than f ring members signed "
                                                   "conflicting versions"]))
        for c in {c.seq: c for c in valid.values()}.values():
            if (c.seq == 1) != (c.prev is None):
                report.add(Problem("cert-chain", f"{label}: the certificate of seq {c.seq} "
                                   f"{'names' if c.prev else 'lacks'} a previous version",
                                   [a], affects=[label]))
            nxt = by_seq.get(c.seq + 1, {})
            for d in nxt.values():
                if d.prev != c.vguid:
                    report.add(Problem("cert-chain", f"{label}: seq {d.seq} does not follow "
                                       f"seq {c.seq} (its prev is {short(d.prev or b'')}, "
                                       f"seq {c.seq} certified {short(c.vguid)})", [a],
                                       affects=[label]))
        newest = max(valid.values(), key=lambda c: (c.seq, c.vguid))
        findings.newest[a] = newest
        for mid, got in answers.items():
            if not isinstance(got, dict) or isinstance(got.get(a), BadCertificate):
                continue
            c = got.get(a)
            if c is None or c.seq < newest.seq:
                findings.stale.setdefault(mid, []).append(a)
                self._add_member_problem(
                    report, "cert-stale", mid, a, label,
                    f"hands out {'no certificate' if c is None else f'seq {c.seq}'} where the "
                    f"newest valid certificate is seq {newest.seq}")
        return newest

    @staticmethod
    def _add_member_problem(report: Report, kind: str, mid: bytes, a: bytes, label: str,
                            detail: str) -> None:
        for p in report.problems:       # one problem per (kind, member), naming its objects
            if p.kind == kind and p.where == mid:
                p.objects.append(a)
                p.affects.append(label)
                p.detail += f"; {label}: {detail}"
                return
        report.add(Problem(kind, f"{label}: {detail}", [a], where=mid,
                           affects=[label, "readers ignore it while 2f+1 members are sound"]))

    # ---- the view -----------------------------------------------------------------

    async def _check_view(self, local: View, vag: bytes, answers, findings: RingFindings,
                          report: Report) -> tuple[View, dict[bytes, str]]:
        raw_blocks: dict[bytes, str] = {}
        cert = self._judge(vag, answers, findings, report)
        if cert is None:
            if findings.up:
                report.add(Problem("view-ring-stale", "the ring holds no view of this volume "
                                   "(the owner publishes it on its first attach)", [vag],
                                   affects=["other writers cannot learn the view from the "
                                            "ring"]))
            return local, raw_blocks
        raw_blocks[cert.vguid] = f"the volume's view (seq {cert.seq})"
        try:
            raw = await self.get_raw(cert.vguid)
            if raw_bguid(raw) != cert.vguid:
                raise BadView("the view block does not hash to its certified VGUID")
            ring_view = View.decode(raw)
            if (ring_view.owner, ring_view.volume) != (local.owner, local.volume):
                raise BadView("the ring's view is of another volume")
        except (StorageError, PeerError) as e:
            report.add(Problem("view-bad", f"the ring's view (seq {cert.seq}): {e}", [vag],
                               affects=["writers attaching take the view held locally"]))
            return local, raw_blocks
        if ring_view.version > local.version:
            report.add(Problem("view-local-stale", f"the view held here is version "
                               f"{local.version}, the ring's is {ring_view.version}", [vag],
                               affects=["this directory's copy of the view (writers added or "
                                        "removed since)"], hint={"view": ring_view}))
            return ring_view, raw_blocks
        if ring_view.version < local.version:
            report.add(Problem("view-ring-stale", f"the ring's view is version "
                               f"{ring_view.version}, the one held here {local.version}",
                               [vag], affects=["other writers do not learn of the newer view"],
                               hint={"view": local}))
        return local, raw_blocks

    async def _check_prev_head(self, a: bytes, cert: Certificate, raw: bytes, p,
                               findings: RingFindings, report: Report) -> None:
        """One step back along the chain: the version the newest certificate
        replaced must be an older head of the same writer (when it can be
        read: old versions are kept, but fsck does not require them)."""
        if cert.prev is None:
            return
        try:
            old_raw = await self.get_raw(cert.prev)
            if raw_bguid(old_raw) != cert.prev:
                return
            old, new = decode_head(old_raw), decode_head(raw)
        except (StorageError, PeerError, LogError):
            return
        if old.writer != new.writer or old.n >= new.n or old.seq > new.seq:
            report.add(Problem("cert-chain", f"{findings.labels[a]}: seq {cert.seq} replaced "
                               f"a head (n={old.n}, seq {old.seq}) that is not older than it "
                               f"(n={new.n}, seq {new.seq})", [a],
                               affects=[f"writer {short(p.id)}: its log was rolled back"]))


async def put_newest(client, findings: RingFindings, timeout: float = DEFAULT_TIMEOUT
                     ) -> dict[bytes, list[bytes]]:
    """Leave the newest certificate of each object with every member that
    handed out an older one (``ring.put_cert``; a member keeps a
    certificate only if it is newer than its own, so this is idempotent).
    Returns member -> the objects it took."""
    ring = client.ring
    took: dict[bytes, list[bytes]] = {}
    for mid, aguids in findings.stale.items():
        m = ring.member(mid)
        if m is None:
            continue
        for a in aguids:
            try:
                await client.transport.request(Peer(m.id, m.addr), PUT_CERT,
                                               {"cert": findings.newest[a].encode()},
                                               timeout=timeout)
            except (PeerError, RemoteError):
                continue
            took.setdefault(mid, []).append(a)
    return took


__all__ = ["RingHeads", "RingFindings", "put_newest", "ERROR", "WARNING"]
