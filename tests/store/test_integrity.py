"""Everything a load returns is verified: bytes, dtype, shape, names, the written record, the window, the header.

Each case edits rows behind the store's back (direct SQL, as damage or a hand edit would) and checks that the
load raises :class:`CorruptSessionError` naming the session, the turn and what failed, that undamaged turns still
load, and that nothing is committed on top of a damaged turn. SQL backends only (the in-memory store has no rows).
"""

from __future__ import annotations

import pytest
from sqlalchemy import delete, update

from deltamem_agents.store import CorruptSessionError, CorruptStateError, SQLSessionStore
from deltamem_agents.store.ops import SESSIONS, SNAPSHOTS, TENSORS, WINDOW, WRITTEN

from ._helpers import blob, commit_turns, new_session, session_pk, snapshot_of, window, written


def _tamper(store: SQLSessionStore, ns: str, stmt) -> None:
    pk = session_pk(store.engine, ns, "s1")
    table = stmt.table
    key = table.c.id if table is SESSIONS else table.c.session_pk
    with store.engine.begin() as conn:
        assert conn.execute(stmt.where(key == pk)).rowcount >= 1


def _t2(table):
    return update(table).where(table.c.turn == 2)


# (statement, load the full record?, what the error must say)
CASES = {
    "bytes-altered": (_t2(TENSORS).where(TENSORS.c.position == 0).values(data=bytes(256)), False, "checksum"),
    "bytes-truncated": (_t2(TENSORS).where(TENSORS.c.position == 0).values(data=bytes(8)), False, "bytes"),
    "dtype-other-size": (_t2(TENSORS).values(dtype="float16"), False, "needs"),
    "dtype-unknown": (_t2(TENSORS).values(dtype="qint8"), False, "dtype"),
    # The forgery: same byte size, so size and data checksum still agree.
    "dtype-same-size": (_t2(TENSORS).where(TENSORS.c.position == 0).values(dtype="int32"), False, "tensor table"),
    "shape-same-size": (_t2(TENSORS).where(TENSORS.c.position == 0).values(shape=[8, 8, 1]), False, "tensor table"),
    "name-swapped": (_t2(TENSORS).where(TENSORS.c.position == 0).values(name="layerX"), False, "tensor table"),
    "tensor-lost": (delete(TENSORS).where(TENSORS.c.turn == 2, TENSORS.c.position == 1), False, "incomplete"),
    "window-text": (_t2(WINDOW).values(content="forged text"), False, "window digest"),
    "window-role": (_t2(WINDOW).values(role="system"), False, "window digest"),
    "window-lost": (delete(WINDOW).where(WINDOW.c.turn == 2), False, "incomplete"),
    "snapshot-counts": (_t2(SNAPSHOTS).values(written_count=5), False, "snapshot row"),
    "snapshot-chain": (_t2(SNAPSHOTS).values(history_digest="0" * 64), False, "snapshot row"),
    "snapshot-digest-erased": (_t2(SNAPSHOTS).values(digest=""), False, "not sealed"),
    "record-digest": (update(WRITTEN).where(WRITTEN.c.turn == 1).values(digest="f" * 64), True, "record chain"),
    "record-role": (update(WRITTEN).where(WRITTEN.c.turn == 2).values(role="assistant"), True, "record chain"),
    "record-tokens": (update(WRITTEN).where(WRITTEN.c.turn == 1).values(tokens=1), True, "record chain"),
    "record-renumbered": (update(WRITTEN).where(WRITTEN.c.turn == 2).values(message_index=7), True, "indexes"),
    "record-lost": (delete(WRITTEN).where(WRITTEN.c.turn == 1), True, "indexes"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_turn_is_refused_on_load(store, ns, case):
    stmt, full, match = CASES[case]
    new_session(store, ns)
    commit_turns(store, ns, "s1", 2)
    _tamper(store, ns, stmt)
    with pytest.raises(CorruptSessionError, match=match) as caught:
        store.load("s1", namespace=ns, full_record=full)
    err = caught.value
    assert (err.namespace, err.session_id, err.turn) == (ns, "s1", 2)
    assert "'s1'" in str(err) and ns in str(err) and "turn 2" in str(err)
    assert isinstance(err, CorruptStateError)  # older handlers still catch it
    # An undamaged turn still loads (the record up to turn 0 is empty).
    assert store.load("s1", namespace=ns, turn=0, full_record=True).turn == 0


@pytest.mark.parametrize("case", ["snapshot-counts", "snapshot-chain", "snapshot-digest-erased"])
def test_no_commit_on_top_of_a_damaged_turn(store, ns, case):
    new_session(store, ns)
    info = commit_turns(store, ns, "s1", 2)
    _tamper(store, ns, CASES[case][0])
    with pytest.raises(CorruptSessionError):
        store.commit("s1", namespace=ns, expected_version=info.version, state=[blob(seed=3)], written=written(2),
                     window=window(2))
    assert store.get("s1", namespace=ns).version == info.version  # nothing was written
    with pytest.raises(CorruptSessionError):
        store.fork("s1", "copy", namespace=ns)
    assert not store.exists("copy", namespace=ns)


@pytest.mark.parametrize(
    "values", [{"model_fingerprint": "another-model"}, {"adapter_fingerprint": "x"}, {"metadata": {"owner": "eve"}}],
    ids=["model-fingerprint", "adapter-fingerprint", "metadata"],
)
def test_altered_header_is_refused(store, ns, values):
    new_session(store, ns, metadata={"owner": "ada"})
    info = commit_turns(store, ns, "s1", 1)
    _tamper(store, ns, update(SESSIONS).values(**values))
    for call in (
        lambda: store.load("s1", namespace=ns),
        lambda: store.commit("s1", namespace=ns, expected_version=info.version, state=[], written=[], window=[]),
        lambda: store.fork("s1", "copy", namespace=ns),
    ):
        with pytest.raises(CorruptSessionError, match="header") as caught:
            call()
        assert (caught.value.session_id, caught.value.turn) == ("s1", None)
    assert store.get("s1", namespace=ns).version == info.version


def test_sealed_rows_survive_fork_rollback_prune_and_reset(url, ns):
    """The digests are computed once at commit and stay valid through every other operation."""
    with SQLSessionStore(url, max_snapshots=2) as store:
        new_session(store, ns, metadata={"n": 1.5, "big": 10**20, "t": ["ü", None]})
        commit_turns(store, ns, "s1", 4)
        store.fork("s1", "f", namespace=ns, new_namespace=ns + "-f")
        try:
            assert store.load("f", namespace=ns + "-f", full_record=True).record.count == 4
        finally:
            store.delete("f", namespace=ns + "-f")
        store.rollback("s1", namespace=ns, turn=3)
        assert store.load("s1", namespace=ns, full_record=True).record.count == 3
        commit_turns(store, ns, "s1", 2, tag="b")
        for t in store.list_turns("s1", namespace=ns):
            store.load("s1", namespace=ns, turn=t.turn, full_record=True)
        store.reset("s1", namespace=ns)
        assert snapshot_of(store, ns, "s1")[1].record.count == 0
