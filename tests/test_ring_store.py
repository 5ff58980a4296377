"""The ring member's LMDB store: undo records of tentative executions (S4)
survive a restart and restore exactly the state before them; a store left
open when the machine crashed says so on the next open; and durable
commits are the only ones that fsync."""

import pytest

from storage import ring_store
from storage.ring_store import RingStore, RingStoreError, u64


async def test_undo_records_restore_exactly_even_after_reopening(tmp_path):
    st = RingStore(tmp_path, sync=False, threaded=False)
    st.put("objects", b"a", b"1")
    st.put("objects", b"b", b"2")
    await st.commit()
    before = (st.items("objects"), st.items("replies"))
    st.journal(7)                                  # the tentative execution of seq 7
    st.put("objects", b"a", b"changed")
    st.put("objects", b"a", b"changed twice")      # one record per key: the first value
    st.delete("objects", b"b")
    st.put("replies", b"r", b"new")
    with pytest.raises(RingStoreError):
        st.clear("objects")                        # no undo for that
    st.journal(8)
    st.put("objects", b"c", b"3")
    st.journal(None)
    await st.commit(durable=False)
    st.env.close()                                 # a crash: no clean close

    st = RingStore(tmp_path, sync=False, threaded=False)
    assert st.get("objects", b"a") == b"changed twice"
    touched = st.undo_from(7)
    assert set(touched) == {("objects", b"a"), ("objects", b"b"), ("objects", b"c"),
                            ("replies", b"r")}
    await st.commit()
    assert (st.items("objects"), st.items("replies")) == before
    assert st.items("undo") == []
    st.close()


async def test_forget_keeps_what_was_decided(tmp_path):
    st = RingStore(tmp_path, sync=False, threaded=False)
    for n in (3, 4):
        st.journal(n)
        st.put("objects", u64(n), b"x")
        st.journal(None)
    st.forget_undo(3)                              # seq 3 decided, 4 not yet
    assert sorted(k for _, k in st.undo_from(4)) == [u64(4)]
    assert st.get("objects", u64(3)) == b"x" and st.get("objects", u64(4)) is None
    assert st.undo_from(3) == []
    st.close()


def test_machine_crash_while_open_is_noticed(tmp_path, monkeypatch):
    st = RingStore(tmp_path, sync=False, threaded=False)
    st.close()
    st = RingStore(tmp_path, sync=False, threaded=False)
    assert not st.maybe_lost                       # closed cleanly before
    st.env.close()                                 # the process dies with it open
    st = RingStore(tmp_path, sync=False, threaded=False)
    assert not st.maybe_lost                       # same boot: the page cache kept it all
    st.env.close()
    monkeypatch.setattr(ring_store, "boot_id", lambda: b"after a reboot")
    st = RingStore(tmp_path, sync=False, threaded=False)
    assert st.maybe_lost                           # open across a reboot
    st.close()


async def test_only_durable_commits_fsync(tmp_path, monkeypatch):
    st = RingStore(tmp_path, sync=True, threaded=False)
    syncs = []
    monkeypatch.setattr(st, "_fsync", lambda: syncs.append(1))
    st.put("slots", u64(1), b"pre-prepare")
    await st.commit(durable=False)
    assert syncs == []
    await st.sync()                                # makes the commit above durable
    await st.sync()                                # nothing new: no second fsync
    assert syncs == [1]
    st.put("meta", b"exec", b"x")
    await st.commit(durable=True)
    assert syncs == [1, 1]
    st.close()
