"""Names of past versions and which of them ``.snapshots`` lists
(DESIGN.md "p2pfs/": past versions browsable read-only; the versions are
``storage.history``'s).

* A version's time is the largest record time in its prefix (writers'
  clocks may disagree; the running maximum keeps times in order). Its name
  is that time in UTC with milliseconds, ``2026-11-25T20:31:07.123Z``.
  Several versions in one millisecond: the first has the bare name, the
  next ones ``...123Z~2``, ``~3``, in the total order (``point_name``).
  Times outside years 1..9999 (a faulty writer's clock) are clamped.
* Time names that are no version's name are read as instants
  (``parse_time``): ``2026-11-25``, ``2026-11-25T20:31Z``, ``...:07Z``,
  ``...:07.123Z``; missing parts are zero.
* Listing (``coarsen``): relative to the newest version, every version of
  the last hour, the last version of each minute for a day, of each hour
  for 30 days, of each day beyond (``TIERS``; buckets aligned to the
  epoch); if that is still more than the cap, every bucket width doubles
  until it is not. Coarsening only hides names: every version stays
  reachable by its exact name.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

MAX_LISTED = 2000                # versions listed at most
_S = 10**9
_MIN = 60 * _S
_HOUR = 3600 * _S
_DAY = 86400 * _S
# (age below which the tier applies, bucket width; 0 keeps every version)
TIERS = ((_HOUR, 0), (_DAY, _MIN), (30 * _DAY, _HOUR), (None, _DAY))
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MIN_MS = -62135596800000        # 0001-01-01T00:00:00.000Z
_MAX_MS = 253402300799999        # 9999-12-31T23:59:59.999Z
_NAME_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{3}))?)?Z)?"
                      r"(?:~(\d{1,9}))?$")


def time_text(time_ns: int) -> str:
    """``time_ns`` (ns since the epoch) as ``YYYY-MM-DDTHH:MM:SS.mmmZ``
    (clamped to years 1..9999)."""
    ms = min(max(time_ns // 1_000_000, _MIN_MS), _MAX_MS)
    t = _EPOCH + timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)


def point_name(time_ns: int, rank: int) -> str:
    """The name of the ``rank``-th version (1-based) within its millisecond."""
    base = time_text(time_ns)
    return base if rank == 1 else f"{base}~{rank}"


def parse_time(text: str) -> tuple[int, int | None] | None:
    """A time name: ``YYYY-MM-DD``, ``...THH:MMZ``, ``...THH:MM:SSZ`` or
    ``...THH:MM:SS.mmmZ`` (the last optionally with ``~rank``), as
    (milliseconds since the epoch, rank or None); None if it is not one."""
    m = _NAME_RE.match(text)
    if m is None:
        return None
    y, mo, d, h, mi, s, ms, rank = m.groups()
    if rank is not None and ms is None:
        return None
    try:
        t = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0),
                     tzinfo=timezone.utc)
    except ValueError:
        return None
    total = (t - _EPOCH) // timedelta(milliseconds=1) + int(ms or 0)
    return total, (int(rank) if rank is not None else None)


def coarsen(points: list, cap: int = MAX_LISTED) -> list:
    """The versions to list (module docstring), oldest first, from
    ``points`` (oldest first, with ``time_ns``): ``TIERS`` relative to the
    newest, bucket widths doubled until at most ``cap`` remain. Buckets are
    aligned to the epoch and a kept version is the last of its bucket, so
    (below the cap) it stays listed as newer versions come until it, or the
    version after it, ages into a coarser tier."""
    if not points:
        return []
    cap = max(1, cap)
    newest = points[-1].time_ns
    tiers = [tier_of(newest - p.time_ns) for p in points]
    widths = [w for _, w in TIERS]
    span = newest - points[0].time_ns
    while True:
        ids = [(t, i) if widths[t] == 0 else (t, p.time_ns // widths[t])
               for i, (t, p) in enumerate(zip(tiers, points))]
        keep = [p for i, p in enumerate(points) if i + 1 == len(points) or ids[i] != ids[i + 1]]
        if len(keep) <= cap:
            return keep
        if all(w > span for w in widths):
            return keep[-cap:]        # one bucket per tier and still too many
        widths = [max(_S, 2 * w) for w in widths]


def tier_of(age_ns: int) -> int:
    """The index in ``TIERS`` of a version this much older than the newest."""
    return next(k for k, (limit, _) in enumerate(TIERS) if limit is None or age_ns < limit)
