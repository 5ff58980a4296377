"""The single-node volume (storage/localstore.py, p2pfs/backend.py): sealed
blocks in LMDB read back verified, log-heads persisted and never rolled
back, a volume directory that survives detaching, refuses a second user and
refuses what is not a volume. Real LMDB stores in temp directories."""

import hashlib
import os

import lmdb
import pytest

from overlay.wire.ids import Identity
from p2pfs.backend import BackendError, LocalBackend, VolumeBusy, is_local_volume, mkfs_local
from storage import seal
from storage.blockapi import Kind
from storage.blockstore import BlockStore
from storage.errors import BadBlock, BlockCorrupt, BlockNotFound, StoreFormatError
from storage.localstore import LocalBlocks, LocalHeadBoard, StaleHead
from storage.logs import LogHead, decode_head
from storage.namespace import Namespace
from storage.volume import create_volume
from storage.vv import VV

KEY = bytes(range(32))


@pytest.fixture
def store(tmp_path):
    s = BlockStore(tmp_path / "blocks")
    yield s
    s.close()


async def test_blocks_round_trip_every_kind(store):
    lb = LocalBlocks(store, KEY)
    items = [(k, os.urandom(n)) for k in Kind for n in (0, 100, 65536)]
    gs = await lb.put_many(items)
    assert len(set(gs)) == len(gs)
    for g, (k, p) in zip(gs, items):
        sealed = store.get(g)
        assert hashlib.sha256(sealed).digest() == g
        assert p not in sealed or not p  # only ciphertext is stored
    assert await lb.get_many([(g, k) for g, (k, _) in zip(gs, items)]) == [p for _, p in items]
    assert await lb.get(gs[0], items[0][0]) == items[0][1]  # the single-block path


async def test_puts_converge_and_survive_reopen(tmp_path):
    path = tmp_path / "blocks"
    with BlockStore(path) as s:
        lb = LocalBlocks(s, KEY)
        g1 = await lb.put(Kind.DATA, b"same bytes")
        assert await lb.put(Kind.DATA, b"same bytes") == g1
        assert await lb.put(Kind.RECORD, b"same bytes") != g1  # the kind is sealed in
    with BlockStore(path) as s:
        assert await LocalBlocks(s, KEY).get(g1, Kind.DATA) == b"same bytes"


async def test_missing_wrong_kind_and_foreign_key(store):
    lb = LocalBlocks(store, KEY)
    with pytest.raises(BlockNotFound):
        await lb.get(bytes(32), Kind.DATA)
    with pytest.raises(BlockNotFound):
        await lb.get_many([(bytes(32), Kind.DATA)] * 3)
    g = await lb.put(Kind.META, b"meta")
    with pytest.raises(BadBlock):
        await lb.get(g, Kind.DATA)
    # Intact bytes under their BGUID, but sealed with another volume's key.
    other = seal.seal(bytes(32), Kind.DATA, b"x" * 1000)
    store.put(other.bguid, other.data)
    with pytest.raises(BlockCorrupt):
        await lb.get(other.bguid, Kind.DATA)


async def test_damaged_block_on_disk_is_refused(tmp_path):
    path = tmp_path / "blocks"
    with BlockStore(path) as s:
        g = await LocalBlocks(s, KEY).put(Kind.DATA, os.urandom(5000))
    env = lmdb.open(str(path), max_dbs=8)
    db = env.open_db(b"blocks")
    with env.begin(write=True) as txn:
        data = bytearray(txn.get(g, db=db))
        data[100] ^= 1
        txn.put(g, bytes(data), db=db)
    env.close()
    with BlockStore(path) as s:
        with pytest.raises(BlockCorrupt):
            await LocalBlocks(s, KEY).get_many([(g, Kind.DATA)] * 3)
        assert s.stats().corruptions == 1  # quarantined, never served again
        with pytest.raises(BlockNotFound):
            await LocalBlocks(s, KEY).get(g, Kind.DATA)


def _head(ident, n, seq=1):
    vol = bytes(32)
    return LogHead.make(ident, vol, seq, os.urandom(32), VV({ident.id: seq}), n, time_ns=n)


async def test_head_board_persists_and_refuses_rollback(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    board = LocalHeadBoard(tmp_path / "heads")
    h1, h2 = _head(a, 1), _head(a, 2, seq=2)
    await board.publish(h1)
    await board.publish(h2)
    await board.publish(h2)  # the same head again: fine
    with pytest.raises(StaleHead):
        await board.publish(h1)
    with pytest.raises(StaleHead):
        await board.publish(_head(a, 2, seq=3))  # same counter, other contents
    assert await board.fetch([]) == {}
    board.close()
    board = LocalHeadBoard(tmp_path / "heads")
    got = await board.fetch([a.id, b.id])
    assert list(got) == [a.id] and decode_head(got[a.id]) == h2
    board.close()


def test_head_board_refuses_other_lmdb(tmp_path):
    env = lmdb.open(str(tmp_path / "x"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"something else", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StoreFormatError):
        LocalHeadBoard(tmp_path / "x")


async def test_volume_survives_detach_and_is_exclusive(tmp_path):
    vol = tmp_path / "vol"
    view = mkfs_local(vol, name="home")
    assert is_local_volume(vol) and view.name == "home"
    assert oct(os.stat(vol / "identity.key").st_mode & 0o777) == "0o600"
    backend = LocalBackend(vol)
    async with backend.attach() as s:
        assert s.replicas == 1 and s.single_writer
        with pytest.raises(VolumeBusy):
            async with LocalBackend(vol).attach():
                pass
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        f = await ns.create(1, b"notes", 0o644, 0, 0)
        await ns.write(f.ino, 0, b"small")
        big = os.urandom(200_000)
        await ns.write(f.ino, 5, big)
        await ns.close()
        total, free = await s.space()
        assert 0 < free < total
    async with backend.attach() as s:
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        f = await ns.lookup(1, b"notes")
        assert await ns.read(f.ino, 0, 1 << 20) == b"small" + big


def test_mkfs_refuses_and_attach_explains(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(BackendError, match="not empty"):
        mkfs_local(tmp_path / "full")
    mkfs_local(tmp_path / "v")
    with pytest.raises(BackendError, match="is a p2pfs volume"):
        mkfs_local(tmp_path / "v")
    with pytest.raises(BackendError, match="not a p2pfs volume"):
        LocalBackend(tmp_path / "full")._read_format()
    (tmp_path / "v" / "FORMAT").write_text('{"format": 9}')
    with pytest.raises(BackendError, match="format"):
        LocalBackend(tmp_path / "v")._read_format()


async def test_attach_with_a_foreign_identity_fails_clearly(tmp_path):
    vol = tmp_path / "vol"
    mkfs_local(vol)
    view, _ = create_volume(Identity.generate(), "other")
    (vol / "view").write_bytes(view.encode())  # a view this identity is not in
    with pytest.raises(BackendError, match="cannot open volume"):
        async with LocalBackend(vol).attach():
            pass
