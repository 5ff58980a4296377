"""One Byzantine member among 4 real member processes on loopback (``python
-m storage.ringnode --byzantine ...``, faults in ``storage.ring_byzantine``):
a backup that signs wrong VGUIDs and forges certificates for readers, a
primary that equivocates, a member that replays old messages. With several
clients racing on one object, no two clients ever accept different
certificates for one (AGUID, seq), and readers reject forged or
under-signed certificates. Every process is stopped by PID at teardown."""

import pytest
import trio

from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer, RemoteError
from storage.certificate import Certificate, verify
from storage.ring import PUT_CERT, STATUS
from storage.ring_errors import Conflict
from storage.ring_local import LocalRing
from storage.ringclient import RingClient

ARGS = ["--request-timeout", "0.6", "--view-change-timeout", "0.6", "--checkpoint", "8",
        "--no-sync"]


def v(k: int) -> bytes:
    return k.to_bytes(32, "big")


class Ledger:
    """Every certificate any client accepted: one VGUID per (AGUID, seq)."""

    def __init__(self, ring):
        self.ring = ring
        self.seen: dict[tuple, bytes] = {}

    def add(self, cert: Certificate) -> Certificate:
        verify(cert, self.ring)
        assert self.seen.setdefault((cert.aguid, cert.seq), cert.vguid) == cert.vguid, \
            f"two certificates for seq {cert.seq}"
        return cert


async def race(clients, ledger, aguid, rounds: int) -> list[Certificate]:
    """Each client does ``rounds`` read-modify-writes with a compare-and-swap
    predicate, retrying on conflict; returns the versions won."""
    won: list[Certificate] = []

    async def loop(tag, c):
        cur = ledger.add(await c.read(aguid))
        for k in range(rounds):
            while True:
                try:
                    cur = ledger.add(await c.update(aguid, v(tag * 1000 + k),
                                                    expect_seq=cur.seq))
                    won.append(cur)
                    break
                except Conflict as e:
                    cur = ledger.add(e.current)

    async with trio.open_nursery() as n:
        for tag, c in enumerate(clients, 1):
            n.start_soon(loop, tag, c)
    return won


@pytest.fixture
async def setup(tmp_path):
    rings = []
    async with TlsTransport(Identity.generate()) as t:

        async def make(byzantine: dict[int, str], writers: int = 3):
            lr = LocalRing(tmp_path, args=ARGS, byzantine=byzantine)
            rings.append(lr)
            await lr.start()

            def client(ident):
                return RingClient(t, lr.ring, ident, attempt_timeout=2.0, deadline=20.0)
            owner = client(lr.owner)
            ws = [client(Identity.generate()) for _ in range(writers)]
            base = await owner.create(b"doc", v(1), writers=[w.me.public_key for w in ws])
            return lr, owner, ws, base

        try:
            yield make
        finally:
            for lr in rings:
                lr.close()


async def status(client, k: int) -> dict:
    m = client.ring.members[k]
    return await client.transport.request(Peer(m.id, m.addr), STATUS, {}, timeout=5.0)


async def test_backup_signing_wrong_vguids_and_forging_for_readers(setup):
    lr, owner, ws, base = await setup({1: "wrong_vguid,forge"})
    ledger = Ledger(lr.ring)
    won = await race(ws, ledger, base.aguid, 4)
    assert sorted(c.seq for c in won) == list(range(2, 14))     # one winner per seq
    liar = lr.ids[1].id
    assert all(liar not in c.signatures for c in won)
    for _ in range(6):                    # the liar forges each time, both ways
        latest = await owner.latest(base.aguid)
        assert (latest.seq, latest.vguid) == (13, ledger.seen[(base.aguid, 13)])
    # An under-signed certificate: no member keeps it, no reader takes it.
    two = Certificate(latest.body, dict(list(latest.signatures.items())[:2]))
    m = lr.ring.members[2]
    with pytest.raises(RemoteError) as e:
        await owner.transport.request(Peer(m.id, m.addr), PUT_CERT, {"cert": two.encode()})
    assert e.value.code == "bad_certificate"


async def test_equivocating_primary(setup):
    lr, owner, ws, base = await setup({0: "equivocate"})
    ledger = Ledger(lr.ring)
    won = await race(ws, ledger, base.aguid, 3)
    assert sorted(c.seq for c in won) == list(range(2, 11))
    assert all(lr.ids[0].id not in c.signatures for c in won)
    assert (await status(owner, 1))["view"] >= 1             # it was voted out


async def test_replaying_member(setup):
    lr, owner, ws, base = await setup({2: "replay"})
    cert = base
    for k in range(2, 12):                # unconditional: a replayed one would show
        cert = await owner.update(base.aguid, v(k))
        assert cert.seq == k
    await trio.sleep(1)                   # replays of an idle ring
    assert (await owner.read(base.aguid)).seq == 11
    ledger = Ledger(lr.ring)
    won = await race(ws, ledger, base.aguid, 3)
    assert sorted(c.seq for c in won) == list(range(12, 21))
    with trio.fail_after(10):             # the honest members end in one state
        while len({(await status(owner, k))["exec"] for k in (0, 1, 3)}) != 1:
            await trio.sleep(0.2)
