"""The inner ring on the simulated network, in virtual time: real PBFT
members with real LMDB stores, real clients, and members that crash, stay
silent or lie (PBFT's fault model, f = 1 of 4)."""

import dataclasses
import os

import pytest
import trio

from overlay.wire.ids import Identity
from overlay.wire.simnet import SimNetwork
from storage.certificate import Certificate, verify
from storage.pbft import PbftConfig
from storage.ring_errors import (
    BadCertificate, BadRequest, Conflict, NotAuthorised, ObjectNotFound, RingUnavailable,
)
from storage.ring_sim import SimRing

SEED = int(os.environ.get("RING_SIM_SEED", "1"))   # the network's latencies
CONFIG = PbftConfig(checkpoint_interval=8, window=16, request_timeout=1.0,
                    view_change_timeout=1.0, max_backoff=2, catchup_interval=0.5)


def v(k: int) -> bytes:
    return k.to_bytes(32, "big")


@pytest.fixture
async def make_ring(nursery, tmp_path):
    async def make(byzantine=None, config=CONFIG, seed=SEED, f=1):
        ring = SimRing(SimNetwork(seed=seed), tmp_path, config=config, byzantine=byzantine, f=f)
        await ring.start(nursery)
        return ring
    return make


class Ledger:
    """Every certificate any client accepted, to check that no two clients
    ever accept different certificates for one (AGUID, seq)."""

    def __init__(self, ring):
        self.ring = ring
        self.seen: dict[tuple, bytes] = {}

    def add(self, cert: Certificate) -> Certificate:
        verify(cert, self.ring.ring)
        key = (cert.aguid, cert.seq)
        assert self.seen.setdefault(key, cert.vguid) == cert.vguid, \
            f"two certificates for seq {cert.seq}"
        return cert


async def update_loop(client, ledger, aguid, tag: int, rounds: int, results: list):
    """Read-modify-write with a compare-and-swap predicate, retrying on
    conflict; records each won version."""
    cur = await client.read(aguid)
    ledger.add(cur)
    for k in range(rounds):
        want = v(tag * 1000 + k)
        while True:
            try:
                cur = ledger.add(await client.update(aguid, want, expect_seq=cur.seq))
                results.append(cur)
                break
            except Conflict as e:
                cur = ledger.add(e.current)


def same_state(ring, members):
    reps = [ring.replica(k) for k in members]
    states = {(r.exec_seq, r.app.snapshot().__repr__()) for r in reps}
    return len(states) == 1


# ---------------------------------------------------------------- normal case


async def test_normal_case_certifies_and_all_members_agree(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    ledger = Ledger(ring)
    cert = ledger.add(await owner.create(b"doc", v(1)))
    assert (cert.seq, cert.vguid, cert.prev) == (1, v(1), None)
    sent = owner.transport.stats.sent
    before = sent["pbft.req"]
    for k in range(2, 30):
        cert = ledger.add(await owner.update(cert.aguid, v(k), expect_seq=cert.seq))
        assert cert.prev == v(k - 1) and cert.seq == k
    # The primary answered each with a whole certificate: one request each.
    assert sent["pbft.req"] - before == 28
    latest = await owner.latest(cert.aguid)
    assert latest.seq == 29 and latest.vguid == v(29)
    assert (await owner.read(cert.aguid)).vguid == v(29)
    await trio.sleep(1)
    assert same_state(ring, range(4))
    r0 = ring.replica(0)
    assert r0.h >= 24 and r0.view == 0            # checkpoints became stable, log trimmed
    assert min(r0.slots, default=r0.h + 1) > r0.h


async def test_refusals_need_no_certificate(make_ring, autojump_clock):
    ring = await make_ring()
    owner, other = ring.owner_client(), ring.client()
    cert = await owner.create(b"doc", v(1))
    with pytest.raises(NotAuthorised):
        await other.update(cert.aguid, v(2))
    with pytest.raises(ObjectNotFound):
        await owner.update(owner.aguid(b"nothing"), v(2))
    with pytest.raises(Conflict) as e:
        await owner.create(b"doc", v(5))
    assert e.value.current.vguid == v(1)
    await owner.set_writers(cert.aguid, [other.me.public_key])
    assert (await other.update(cert.aguid, v(2))).seq == 2


async def test_concurrent_same_predicate_exactly_one_wins(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    writers = [ring.client() for _ in range(6)]
    base = await owner.create(b"doc", v(1), writers=[w.me.public_key for w in writers])
    won, lost = [], []

    async def attempt(k, w):
        try:
            won.append(await w.update(base.aguid, v(100 + k), expect_seq=1))
        except Conflict as e:
            lost.append(e.current)

    async with trio.open_nursery() as n:
        for k, w in enumerate(writers):
            n.start_soon(attempt, k, w)
    assert len(won) == 1 and len(lost) == 5
    for c in lost:
        verify(c, ring.ring)
        assert (c.seq, c.vguid) == (2, won[0].vguid)


async def test_retry_is_applied_once(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    req = owner.request({"op": "update", "aguid": cert.aguid, "vguid": v(2)})  # no predicate
    first = await owner.resubmit(req)
    again = await owner.resubmit(req)
    assert first.seq == again.seq == 2
    assert (await owner.read(cert.aguid)).seq == 2


async def test_forged_certificates_are_rejected(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    two = Certificate(cert.body, dict(list(cert.signatures.items())[:2]))
    with pytest.raises(BadCertificate):
        verify(two, ring.ring)
    # A member refuses to keep an under-signed one, and a reader skips a
    # forged one a member hands out.
    from overlay.wire.transport import RemoteError
    from storage.ring import PUT_CERT
    m = ring.ring.members[0]
    from overlay.wire.transport import Peer
    with pytest.raises(RemoteError) as e:
        await owner.transport.request(Peer(m.id, m.addr), PUT_CERT, {"cert": two.encode()})
    assert e.value.code == "bad_certificate"
    forged = Certificate(cert.body.__class__(*[getattr(cert.body, f) for f in (
        "ring_id", "epoch", "aguid")], 9, v(66), v(1), 0), cert.signatures)
    ring.services[0].store.put("certs", cert.aguid, forged.encode())
    latest = await owner.latest(cert.aguid)
    assert latest.vguid == v(1)


# ---------------------------------------------------------------- faults


async def test_silent_primary_view_change(make_ring, autojump_clock):
    ring = await make_ring(byzantine={0: {"silent"}})
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    for k in range(2, 8):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    assert cert.seq == 7
    assert all(ring.replica(k).view >= 1 for k in (1, 2, 3))
    assert ring.replica(1).stats["view_changes"] >= 1


async def test_crashed_member_does_not_stop_progress(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    await ring.crash(2)
    for k in range(2, 6):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    await ring.crash(0)               # two down: no more certificates
    with pytest.raises(RingUnavailable):
        await ring.owner_client(deadline=5.0).update(cert.aguid, v(9), expect_seq=cert.seq)


async def test_equivocating_primary_cannot_fork(make_ring, autojump_clock):
    ring = await make_ring(byzantine={0: {"equivocate"}})
    owner = ring.owner_client()
    writers = [ring.client() for _ in range(4)]
    ledger = Ledger(ring)
    base = ledger.add(await owner.create(b"doc", v(1), writers=[w.me.public_key for w in
                                                                   writers]))
    results: list = []
    async with trio.open_nursery() as n:
        for k, w in enumerate(writers):
            n.start_soon(update_loop, w, ledger, base.aguid, k + 1, 3, results)
    assert len(results) == 12
    assert sorted(c.seq for c in results) == list(range(2, 14))   # one winner per seq
    assert ring.replica(1).view >= 1          # the equivocator was voted out
    for c in results:                         # the liar's shares never make it in
        assert ring.ids[0].id not in c.signatures


async def test_byzantine_backup_signing_wrong_vguids(make_ring, autojump_clock):
    ring = await make_ring(byzantine={1: {"wrong_vguid"}})
    owner = ring.owner_client()
    writers = [ring.client() for _ in range(3)]
    ledger = Ledger(ring)
    base = ledger.add(await owner.create(b"doc", v(1), writers=[w.me.public_key for w in
                                                                   writers]))
    results: list = []
    async with trio.open_nursery() as n:
        for k, w in enumerate(writers):
            n.start_soon(update_loop, w, ledger, base.aguid, k + 1, 4, results)
    assert sorted(c.seq for c in results) == list(range(2, 14))
    for c in results:
        assert ring.ids[1].id not in c.signatures
    latest = await owner.latest(base.aguid)
    assert latest.seq == 13


async def test_replaying_member_changes_nothing(make_ring, autojump_clock):
    ring = await make_ring(byzantine={2: {"replay"}})
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    for k in range(2, 25):                    # unconditional: a replayed one would show
        cert = await owner.update(cert.aguid, v(k))
        assert cert.seq == k
    await trio.sleep(5)                       # let the replays run on an idle ring
    assert (await owner.read(cert.aguid)).seq == 24
    # Concurrent writers: still one certificate per seq.
    writers = [ring.client() for _ in range(3)]
    await owner.set_writers(cert.aguid, [w.me.public_key for w in writers])
    ledger, results = Ledger(ring), []
    async with trio.open_nursery() as n:
        for k, w in enumerate(writers):
            n.start_soon(update_loop, w, ledger, cert.aguid, k + 1, 3, results)
    assert sorted(c.seq for c in results) == list(range(25, 34))
    await trio.sleep(2)                       # the slowest member executes the last one too
    assert same_state(ring, (0, 1, 3))


async def test_replaying_primary_orders_old_requests_again_harmlessly(make_ring,
                                                                      autojump_clock):
    """The primary puts old requests into new batches: members order them
    again, but execute each request once."""
    ring = await make_ring(byzantine={0: {"replay"}})
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    for k in range(2, 20):
        cert = await owner.update(cert.aguid, v(k))   # unconditional
        assert cert.seq == k
    assert (await owner.read(cert.aguid)).seq == 19
    await trio.sleep(2)
    # Members that executed everything themselves (no snapshot installed)
    # executed exactly create, 18 updates and the read.
    counts = [ring.replica(k).stats["executed"] for k in (1, 2, 3)
              if ring.replica(k).stats["state_transfers"] == 0]
    assert counts and all(c == 20 for c in counts)


@pytest.mark.parametrize("f", [0, 2])
async def test_other_ring_sizes(make_ring, autojump_clock, f):
    """f=0 (a ring of one) and f=2 (seven members, two of them faulty: a
    silent primary and a liar) work the same way."""
    byz = {0: {"silent"}, 3: {"wrong_vguid"}} if f == 2 else None
    ring = await make_ring(byzantine=byz, f=f)
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    for k in range(2, 8):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    verify(cert, ring.ring)
    assert cert.seq == 7 and len(cert.signatures) >= 2 * f + 1


async def test_two_down_then_resume(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client(deadline=6.0)
    cert = await owner.create(b"doc", v(1))
    await ring.crash(1)
    await ring.crash(3)
    with pytest.raises(RingUnavailable) as e:
        await owner.update(cert.aguid, v(2), expect_seq=1)
    msg = str(e.value)
    assert "2 of 4 members" in msg and "3 (2f+1)" in msg and "resubmit" in msg
    await ring.restart(3)
    cert2 = await owner.resubmit(e.value.request)     # the same request, applied once
    assert (cert2.seq, cert2.vguid) == (2, v(2))
    cert3 = await owner.update(cert.aguid, v(3), expect_seq=2)
    assert cert3.seq == 3


async def test_restart_mid_stream_catches_up(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    await ring.crash(3)
    for k in range(2, 45):                    # several stable checkpoints pass it by
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    await ring.restart(3)
    for k in range(45, 50):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    await trio.sleep(3)
    assert ring.replica(3).exec_seq == ring.replica(0).exec_seq
    assert same_state(ring, range(4))
    assert ring.replica(3).stats["state_transfers"] >= 1
    # It is a full member again: with another member down it is needed.
    await ring.crash(1)
    cert = await owner.update(cert.aguid, v(50), expect_seq=cert.seq)
    assert cert.seq == 50 and ring.ids[3].id in cert.signatures


async def test_restarted_member_recovers_from_its_own_store(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    for k in range(2, 12):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    await trio.sleep(1)
    before = ring.replica(2).exec_seq
    await ring.crash(2)
    await ring.restart(2)
    r = ring.replica(2)
    assert r.exec_seq == before and r.stats["state_transfers"] == 0
    assert r.app.objects[cert.aguid].seq == 11


# ---------------------------------------------------------------- member replacement


async def test_failed_member_replaced_by_agreement(make_ring, autojump_clock):
    ring = await make_ring()
    owner = ring.owner_client()
    stale_reader = ring.client()          # keeps the epoch-0 descriptor
    cert = await owner.create(b"doc", v(1), writers=[stale_reader.me.public_key])
    for k in range(2, 12):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    await ring.crash(3)                   # it fails for good
    old_ring = ring.ring
    new_ring = ring.successor(3)          # the owner signs its replacement
    change = await owner.reconfigure(new_ring)
    old_ring.verify_successor(new_ring, change)    # certified by the old ring
    assert owner.ring == new_ring and change.seq == 1
    await ring.start_member(3)            # the new member joins and catches up
    for k in range(12, 16):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    assert cert.epoch == 1
    verify(cert, new_ring)
    with pytest.raises(BadCertificate):   # epoch-1 certificates are not epoch 0's
        verify(cert, old_ring)
    await ring.crash(1)                   # now the new member is needed
    cert = await owner.update(cert.aguid, v(16), expect_seq=cert.seq)
    assert ring.ids[3].id in cert.signatures
    assert ring.replica(3).app.objects[cert.aguid].seq == 16
    # A client that still has the old descriptor follows the ring.
    cert = await stale_reader.update(cert.aguid, v(17), expect_seq=cert.seq)
    assert stale_reader.ring.epoch == 1 and cert.seq == 17


async def test_only_the_owner_reconfigures(make_ring, autojump_clock):
    ring = await make_ring()
    other = ring.client()
    nxt = ring.ring.successor(ring.ids[3].id, Identity.from_seed(b"x").public_key, "sim:x")
    with pytest.raises(NotAuthorised):
        await other.reconfigure(nxt.signed(ring.owner))
    with pytest.raises(BadRequest):       # unsigned by the owner: refused as malformed
        await ring.owner_client().reconfigure(nxt)


# ---------------------------------------------------------------- tentative execution

# The primary holds its COMMITTED relays (ring_execution) for ever unless a
# new PRE-PREPARE carries them: backups keep the last batch tentative.
HOLD = PbftConfig(checkpoint_interval=8, window=16, request_timeout=1.0,
                  view_change_timeout=1.0, max_backoff=2, catchup_interval=0.5,
                  commit_delay=10_000.0)


def stored_state(r) -> tuple:
    """What a member's store says, next to what it holds in memory."""
    import msgpack
    exec_seq = msgpack.unpackb(r.store.get("meta", b"exec"))[0]
    objects = dict(r.store.items("objects"))
    return exec_seq, objects


async def test_tentative_execution_is_taken_back_exactly(make_ring, autojump_clock):
    ring = await make_ring(config=HOLD)
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    for k in range(2, 5):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    r0, r1 = ring.replica(0), ring.replica(1)
    r0._release_committed()
    await trio.sleep(0.5)
    assert r1.exec_seq == r1.committed_seq == 4
    before = (r1._snapshot_bytes(), stored_state(r1))
    cert = await owner.update(cert.aguid, v(5), expect_seq=cert.seq)   # certified ...
    assert cert.seq == 5 and r1.exec_seq == 5 and r1.committed_seq == 4   # ... tentatively
    assert r1.app.objects[cert.aguid].seq == 5
    r1._rollback()
    assert (r1._snapshot_bytes(), stored_state(r1)) == before
    assert r1.exec_seq == 4 and r1.app.objects[cert.aguid].seq == 4
    assert r1.result_of(owner.me.public_key, owner._last_rid) is None
    assert not r1.store.items("undo")
    r0._release_committed()          # the decision arrives: it runs again, for good
    await trio.sleep(0.5)
    assert r1.committed_seq == 5 and same_state(ring, range(4))
    assert r1.stats["rollbacks"] == 1


async def test_view_change_takes_back_tentative_executions(make_ring, autojump_clock):
    ring = await make_ring(config=HOLD)
    owner = ring.owner_client()
    ledger = Ledger(ring)
    cert = ledger.add(await owner.create(b"doc", v(1)))
    for k in range(2, 6):
        cert = ledger.add(await owner.update(cert.aguid, v(k), expect_seq=cert.seq))
    assert all(ring.replica(k).exec_seq > ring.replica(k).committed_seq for k in (1, 2, 3))
    await ring.crash(0)              # the primary: its decision of seq 5 dies with it
    for k in range(6, 9):
        cert = ledger.add(await owner.update(cert.aguid, v(k), expect_seq=cert.seq))
    assert cert.seq == 8
    assert all(ring.replica(k).stats["rollbacks"] >= 1 for k in (1, 2, 3))
    await trio.sleep(2)
    assert same_state(ring, (1, 2, 3))
    got = await owner.read(cert.aguid)          # seq 5 survived, as certified
    assert (got.seq, got.vguid) == (8, v(8))


async def test_restart_takes_back_tentative_executions(make_ring, autojump_clock):
    ring = await make_ring(config=HOLD)
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    for k in range(2, 5):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    r2 = ring.replica(2)
    assert (r2.exec_seq, r2.committed_seq) == (4, 3)
    await ring.crash(2)
    await ring.restart(2)
    r2 = ring.replica(2)
    # Recovery took seq 4 back (S4), then ran it again, tentatively, from
    # its prepared certificate: once, not on top of the first run.
    assert (r2.exec_seq, r2.committed_seq) == (4, 3)
    assert r2.app.objects[cert.aguid].seq == 4 and same_state(ring, (1, 2, 3))
    for k in range(5, 8):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    ring.replica(0)._release_committed()
    await trio.sleep(2)
    assert same_state(ring, range(4)) and ring.replica(2).committed_seq == 7


async def test_member_mute_after_machine_crash(make_ring, autojump_clock, monkeypatch):
    """A member whose store says the machine crashed under it (un-fsynced
    commits may be lost) sends no agreement messages in that view, and
    takes part again from the next one."""
    from storage import ring_store
    ring = await make_ring()
    owner = ring.owner_client()
    cert = await owner.create(b"doc", v(1))
    await ring.crash(2)
    # Its store was open when the machine went down (no clean close), and
    # the machine booted again since.
    st = ring_store.RingStore(ring.dir / f"member-{ring.ids[2].id[:6].hex()}", sync=False,
                              threaded=False)
    st.env.close()
    monkeypatch.setattr(ring_store, "boot_id", lambda: b"another boot")
    sent = []
    await ring.restart(2)
    r2 = ring.replica(2)
    assert r2.mute_view == 0
    route = r2._route
    r2._route = lambda to, m: (sent.append(m["t"]), route(to, m))
    for k in range(2, 5):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    await trio.sleep(1)
    assert not {"p", "c"} & set(sent) and r2.committed_seq == 4
    await ring.crash(0)              # a view change: member 2 speaks again
    for k in range(5, 8):
        cert = await owner.update(cert.aguid, v(k), expect_seq=cert.seq)
    assert r2.view >= 1 and {"p", "c"} & set(sent)


async def test_lost_messages_are_sent_again(nursery, tmp_path, autojump_clock):
    """One message in ten lost, frames and replies alike: the primary sends
    again what stalls, members catch up on what they missed, and no two
    clients ever see different certificates for one seq."""
    ring = SimRing(SimNetwork(seed=SEED, loss=0.1), tmp_path, config=CONFIG)
    await ring.start(nursery)
    owner = ring.owner_client(deadline=30.0)
    writers = [ring.client(deadline=30.0) for _ in range(2)]
    ledger = Ledger(ring)
    base = ledger.add(await owner.create(b"doc", v(1), writers=[w.me.public_key for w in
                                                                   writers]))
    results: list = []
    async with trio.open_nursery() as n:
        for k, w in enumerate(writers):
            n.start_soon(update_loop, w, ledger, base.aguid, k + 1, 5, results)
    assert sorted(c.seq for c in results) == list(range(2, 12))
    ring.net.set_loss(0.0)
    await trio.sleep(5)
    assert same_state(ring, range(4))


async def test_a_decided_batch_never_holds_back_the_pipeline(make_ring, autojump_clock):
    """With one batch in flight at a time, a seq the primary still counted
    in flight after it was decided (a NEW-VIEW re-proposes batches the old
    view decided) would stop it proposing: every later request would wait
    for a view change. The primary only counts undecided batches."""
    ring = await make_ring(config=dataclasses.replace(CONFIG, pipeline=1))
    owner = ring.owner_client()
    ledger = Ledger(ring)
    cert = ledger.add(await owner.create(b"doc", v(1)))
    primary = ring.replica(0)
    primary.my_inflight.add(primary.committed_seq)    # decided, yet counted in flight
    for k in range(2, 5):
        cert = ledger.add(await owner.update(cert.aguid, v(k), expect_seq=cert.seq))
    assert cert.seq == 4
    assert all(ring.replica(k).view == 0 for k in range(4))
    assert ring.replica(0).stats["view_changes"] == 0


async def test_idle_ring_brings_every_member_up_to_date(make_ring, autojump_clock):
    """Members that lost the last messages of a burst (a PRE-PREPARE, a
    PREPARED, a COMMITTED) catch up although no request follows: the
    primary sends a decided batch again to whoever did not commit it, and
    its last decisions to all once idle."""
    ring = await make_ring()
    owner = ring.owner_client(deadline=30.0)
    ledger = Ledger(ring)
    cert = ledger.add(await owner.create(b"doc", v(1)))
    # Member 3 hears nothing of the next updates (the primary relays all),
    # and after them no request comes to show it what it missed.
    ring.net.cut(ring.ids[0].id, ring.ids[3].id)
    for k in range(2, 6):
        cert = ledger.add(await owner.update(cert.aguid, v(k), expect_seq=cert.seq))
    ring.net.restore(ring.ids[0].id, ring.ids[3].id)
    await trio.sleep(5)
    assert same_state(ring, range(4))
    assert {ring.replica(k).committed_seq for k in range(4)} == {ring.replica(0).exec_seq}
