"""Log-heads and the view certified by the inner ring (DESIGN.md
"storage/logs"; Ivy, OSDI 2002, section 3 with its known weakness closed;
Pond's inner ring, FAST 2003, section 4).

In Ivy a log-head is a record in the DHT signed by its writer: a storage
node can hand a reader an old one (rollback) and nobody can tell. Here each
writer's log-head is an *object* on the volume's inner ring: the encoded
head is kept as an immutable block (its BGUID is the version's VGUID) and
the ring certifies, with 2f+1 member signatures, which head is current
(AGUID = the writer's key and ``b"p2pfs log-head\\0" + volume``). A reader
fetches the newest certificate of each writer, then the head block it names,
so a storage node cannot substitute an old head (the BGUID is a hash) and a
single ring member cannot either (the client takes the newest verified
certificate among 2f+1 answers). ``LogReader`` still checks the writer's
signature and refuses rollbacks and forks on top.

Writes during partitions: :meth:`RingHeadBoard.publish` first makes the head
durable in the writer's local board (``local``), then certifies it. When
the ring cannot be reached (fewer than 2f+1 members on this side), the head
stays valid on the writer's signature alone, as in Ivy: the writer keeps
working and sees its own writes, a background task retries with backoff,
and once the ring is back the newest head is certified (heads are
cumulative, so only the newest matters; intermediate ones are skipped).
Other writers see these updates when certified: after the partition heals,
every reader merges every log.

Write-ahead heads (``HeadBoard.publish_ahead``): the local board keeps the
head with the record blocks it names; certification starts only at
``release``, once those blocks are stored, so the ring never certifies a
head whose records are missing.

Waiting: with ``wait=True`` (volumes with several active writers, where
close-to-open visibility is owed to others) ``publish`` returns once the
head is certified or the ring proved unreachable. With ``wait=False``
(a volume with one writer) it returns once the head is durable locally and
certification follows in the background, coalesced: a head published within
``interval`` seconds of the previous certification waits for the rest of
that interval, so a burst of closes costs one agreement, one head block and
one certificate hand-out per interval instead of one per close (an isolated
close is certified at once). The interval, 1 s, is how far behind the
writer a reader of such a volume may be during a burst. An agreement costs
the ring's members about 25 ms of CPU together and the writer a head block
stored at r holders; at 0.25 s that was a tenth of the CPU of a burst of
small-file closes on a 2-core machine (ops/s +10% at 1 s, measured with two
demos side by side). Unmounting calls :meth:`settle`.

The view (writers, wrapped keys) is an object of the volume's owner on the
same ring (AGUID = owner key and ``b"p2pfs view\\0" + volume``); its block is
stored unsealed, since a writer needs the view to unwrap the volume key. A
view verifies under the owner's signature, so storage cannot forge one.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Awaitable, Callable

import trio

from overlay.wire.ids import short

from .certificate import Certificate
from .errors import StorageError
from .logs import HeadBoard, LogHead, decode_head
from .ring import aguid_of
from .ring_errors import Conflict, ObjectNotFound, RingError, RingUnavailable
from .ringclient import RingClient
from .volume import BadView, View

log = logging.getLogger(__name__)

HEAD_OBJECT = b"p2pfs log-head\0"
VIEW_OBJECT = b"p2pfs view\0"
RETRY_MIN, RETRY_MAX = 0.5, 30.0
INTERVAL = 1.0          # seconds between background certifications (wait=False)
PROBE_INTERVAL = 5.0    # while the ring is unreachable, fetch asks it at most this often

PutRaw = Callable[[bytes], Awaitable[bytes]]        # bytes -> BGUID (hash of the bytes)
GetRaw = Callable[[bytes], Awaitable[bytes]]        # BGUID -> verified bytes


class RingBoardError(StorageError):
    """The ring answered with something a log-head board cannot use (a
    certificate naming a block that is not a head of that writer)."""


def head_name(volume: bytes) -> bytes:
    return HEAD_OBJECT + volume


def head_aguid(writer_public_key: bytes, volume: bytes) -> bytes:
    """The ring object holding ``writer``'s current log-head."""
    return aguid_of(writer_public_key, head_name(volume))


def view_name(volume: bytes) -> bytes:
    return VIEW_OBJECT + volume


def view_aguid(owner_public_key: bytes, volume: bytes) -> bytes:
    return aguid_of(owner_public_key, view_name(volume))


def raw_bguid(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class RingHeadBoard(HeadBoard):
    """Log-heads certified by the inner ring (module docstring).

    ``client`` signs as this writer; ``keys`` maps a writer id to its public
    key (from the current view); ``put_raw``/``get_raw`` store and fetch
    immutable blocks by the hash of their bytes; ``local`` is the writer's
    own durable board (its newest head survives a crash before
    certification). Run :meth:`run` in a nursery for background
    certification."""

    def __init__(self, client: RingClient, volume: bytes, keys: Callable[[bytes], bytes],
                 put_raw: PutRaw, get_raw: GetRaw, local: HeadBoard, *, wait: bool = True,
                 wait_timeout: float | None = None, interval: float = INTERVAL):
        self.client = client
        self.volume = volume
        self.keys = keys
        self.put_raw = put_raw
        self.get_raw = get_raw
        self.local = local
        self.wait = wait
        self.interval = interval
        self._last_start = -float("inf")            # trio time the last certification began
        self.wait_timeout = wait_timeout if wait_timeout is not None else client.deadline + 5
        self.me = client.me.id
        self._want: LogHead | None = None          # newest head not yet known certified
        self._certified: Certificate | None = None  # our newest certificate
        self._certified_n = 0                       # publish counter it covers
        self._changed = trio.Event()                # a new head to certify
        self._hurry = trio.Event()                  # someone waits: no coalescing
        self._progress = trio.Event()               # certification advanced or failed
        self._poke = trio.Event()                   # a new head or a settle: retry sooner
        self._probed = -float("inf")                # trio time fetch last asked the ring
        self._fetch_failed = False                  # that attempt reached no member
        self._reachable = True                      # the last attempt reached the ring
        self._heads: dict[bytes, bytes] = {}        # VGUID -> encoded head (immutable)
        self._last: dict[bytes, bytes] = {}         # writer -> last head fetched
        self.certified = 0                          # certificates obtained (statistics)
        self.unreachable_since: float | None = None

    # ---- publishing --------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        """True while the ring could not be reached for our newest head."""
        return not self._reachable

    @property
    def pending(self) -> bool:
        """A head published locally and not yet certified."""
        return self._want is not None and self._want.n > self._certified_n

    @property
    def journals(self) -> bool:
        return self.local.journals

    async def publish_ahead(self, head: LogHead, journal: list[tuple[int, bytes]]) -> None:
        await self.local.publish_ahead(head, journal)

    async def journal(self, writer: bytes) -> list[tuple[int, bytes]]:
        return await self.local.journal(writer)

    async def flush(self) -> None:
        await self.local.flush()

    async def publish(self, head: LogHead) -> None:
        await self.local.publish(head)          # durable first: the writer's own promise
        await self.release(head)

    async def release(self, head: LogHead) -> None:
        if self._want is None or head.n > self._want.n:
            self._want = head
            self._changed.set()
            self._poke.set()
        if not self.wait:
            return
        self._hurry.set()
        with trio.move_on_after(self.wait_timeout):
            while self._certified_n < head.n and self._reachable:
                ev = self._progress
                await ev.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Certify the newest local head whenever there is one (background)."""
        own = (await self.local.fetch([self.me])).get(self.me)
        try:
            journal = await self.local.journal(self.me)
        except StorageError as e:
            log.warning("%s", e)
            journal = []
        if own is not None and not journal:
            self._want = decode_head(own)   # certify what a crash left uncertified
            self._changed.set()
        # (With a journal, the session stores its blocks first, then releases.)
        task_status.started()
        delay = RETRY_MIN
        while True:
            await self._changed.wait()
            if not self.wait:
                # Coalesce a burst (module docstring) unless someone waits.
                with trio.move_on_at(self._last_start + self.interval):
                    await self._hurry.wait()
            self._hurry = trio.Event()
            self._changed = trio.Event()
            while self.pending:
                self._last_start = trio.current_time()
                try:
                    await self._certify(self._want)
                    if not self._reachable:
                        log.info("inner ring reachable again: log-head %d certified",
                                 self._certified_n)
                    self._reachable, self.unreachable_since, delay = True, None, RETRY_MIN
                except (RingUnavailable, trio.TooSlowError) as e:
                    if self._reachable:
                        log.warning("inner ring unreachable (%s); working on: heads are "
                                    "kept locally and certified when it is back", e)
                        self.unreachable_since = trio.current_time()
                    self._reachable = False
                    self._wake()
                    await self._back_off(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                except (RingError, StorageError) as e:
                    log.error("log-head %d not certified: %s", self._want.n, e)
                    self._reachable = False
                    self._wake()
                    await trio.sleep(RETRY_MAX)
                    continue
                self._wake()
                break       # heads published meanwhile set _changed: next interval

    async def settle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the newest published head to
        be certified (at unmount); False if it is not (it stays durable
        locally and is certified on the next mount)."""
        with trio.move_on_after(timeout):
            self._hurry.set()
            self._poke.set()
            while self.pending and self._reachable:
                await self._progress.wait()
        return not self.pending

    async def _back_off(self, delay: float) -> None:
        """Wait ``delay`` s before trying the ring again, or less (but at
        least RETRY_MIN) when a new head is published or someone settles:
        after a partition heals, the next close is certified at once rather
        than when a long backoff ends."""
        self._poke = trio.Event()
        await trio.sleep(RETRY_MIN)
        with trio.move_on_after(max(0.0, delay - RETRY_MIN)):
            await self._poke.wait()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _certify(self, head: LogHead) -> None:
        raw = head.encode()
        vguid = await self.put_raw(raw)
        self._heads[vguid] = raw
        aguid = head_aguid(self.client.me.public_key, self.volume)
        cur = self._certified
        if cur is None:
            cur = await self.client.latest(aguid)
        while True:
            try:
                if cur is None:
                    cert = await self.client.create(head_name(self.volume), vguid)
                else:
                    if cur.vguid == vguid:
                        cert = cur
                    else:
                        cert = await self.client.update(aguid, vguid, expect_seq=cur.seq)
                break
            except Conflict as e:
                # Another attempt of ours (a retry, or before a restart) got
                # there first: keep it if it is at least as new.
                cur = e.current
                theirs = decode_head(await self._head_block(cur.vguid))
                if theirs.writer == self.me and theirs.n >= head.n:
                    cert = cur
                    break
        self._certified = cert
        n = decode_head(await self._head_block(cert.vguid)).n
        self._certified_n = max(self._certified_n, n)
        self.certified += 1
        try:
            await self.client.publish(cert)     # members keep it: readers need no assembly
        except RingError:
            pass

    async def _head_block(self, vguid: bytes) -> bytes:
        raw = self._heads.get(vguid)
        if raw is None:
            raw = await self.get_raw(vguid)
            if raw_bguid(raw) != vguid:
                raise RingBoardError(f"block {short(vguid)} does not match its name")
            self._heads[vguid] = raw
            if len(self._heads) > 4096:
                self._heads.pop(next(iter(self._heads)))
        return raw

    # ---- fetching ------------------------------------------------------------

    async def fetch(self, writers: list[bytes]) -> dict[bytes, bytes]:
        """The newest certified head of each writer; for this writer, its
        local head when newer (not certified yet). When the ring cannot be
        reached, the heads fetched last (the reader's rollback checks still
        apply to them). While the ring is unreachable (our certification
        failed, or the last fetch reached no member), it is asked at most
        every PROBE_INTERVAL seconds and other fetches answer from those
        heads at once: a writer cut off from the ring does not wait the ring
        client's timeout on every open."""
        out: dict[bytes, bytes] = {}
        unreachable: list[str] = []
        now = trio.current_time()
        others = [w for w in writers if w != self.me]
        if (others and (not self._reachable or self._fetch_failed)
                and now - self._probed < PROBE_INTERVAL):
            out = {w: self._last[w] for w in others if w in self._last}
            others = []
        elif others:
            self._probed = now

        async def one(w: bytes) -> None:
            try:
                cert = await self.client.latest(head_aguid(self.keys(w), self.volume))
                if cert is None:
                    return
                raw = await self._head_block(cert.vguid)
            except (RingUnavailable, trio.TooSlowError) as e:
                unreachable.append(str(e))
                if w in self._last:
                    out[w] = self._last[w]
                return
            except (StorageError, KeyError) as e:
                log.warning("log-head of writer %s unavailable: %s", short(w), e)
                if w in self._last:
                    out[w] = self._last[w]
                return
            out[w] = raw
            self._last[w] = raw

        if others:
            async with trio.open_nursery() as n:
                for w in others:
                    n.start_soon(one, w)
            self._fetch_failed = len(unreachable) == len(others)
        if self.me in writers:
            local = (await self.local.fetch([self.me])).get(self.me)
            if local is not None:
                out[self.me] = local
        if unreachable and writers != [self.me]:
            log.debug("heads fetched from cache: %s", unreachable[0])
        return out


# --------------------------------------------------------------------------
# The view on the ring


async def publish_view(client: RingClient, put_raw: PutRaw, view: View) -> Certificate:
    """Make ``view`` the volume's current view on the ring (the owner only).
    Creates the object for version 1; later versions must succeed the
    current one (``View.check_successor``)."""
    if client.me.public_key != view.owner:
        raise BadView("only the volume's owner publishes its view")
    raw = view.encode()
    vguid = await put_raw(raw)
    aguid = view_aguid(view.owner, view.volume)
    cur = await client.latest(aguid)
    if cur is None:
        try:
            return await client.create(view_name(view.volume), vguid)
        except Conflict as e:
            cur = e.current
    if cur.vguid == vguid:
        return cur
    return await client.update(aguid, vguid, expect_seq=cur.seq)


async def fetch_view(client: RingClient, get_raw: GetRaw, owner: bytes, volume: bytes,
                     known: View | None = None) -> View | None:
    """The newest certified view of the volume (None if the ring holds none
    yet). A view that is not a valid successor of ``known`` is refused."""
    cert = await client.latest(view_aguid(owner, volume))
    if cert is None:
        return None
    raw = await get_raw(cert.vguid)
    if raw_bguid(raw) != cert.vguid:
        raise BadView("the view block does not match its certificate")
    view = View.decode(raw)
    view.verify()
    if (view.owner, view.volume) != (owner, volume):
        raise BadView("the ring's view is of another volume")
    if known is not None and view.version < known.version:
        raise BadView(f"the ring's view (version {view.version}) is older than the one "
                      f"held here ({known.version})")
    if known is not None and view.version == known.version + 1:
        view.check_successor(known)     # several versions ahead: the owner's signature suffices
    return view
