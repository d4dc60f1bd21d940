"""The store contract, run on every backend: an SQLite file, PostgreSQL and the in-memory store.

Assertions about rows (direct SQL) run on the SQL backends only; everything observable through the contract runs
on all three, so the in-memory store has the same semantics as the SQL ones."""

from __future__ import annotations

import time
from datetime import UTC

import pytest

from deltamem_agents.store import (
    ConcurrentUpdateError,
    CorruptStateError,
    InvalidIdentifierError,
    RecordSummary,
    SessionExistsError,
    SessionNotFoundError,
    SessionStore,
    SQLSessionStore,
    TensorBlob,
    sha256_hex,
)
from deltamem_agents.store.memory import InMemorySessionStore

from ._helpers import (
    TABLES,
    blob,
    commit_turns,
    indexes,
    new_session,
    row_counts,
    session_pk,
    snapshot_of,
    window,
    written,
)
from .conftest import BACKENDS, backend_url, purge_namespace


@pytest.fixture(params=(*BACKENDS, "memory"))
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_store(backend, tmp_path, ns):
    """``make_store(**options)``: a store of this backend (SQL stores are cleaned up and closed after)."""
    made = []

    def make(**options):
        s = InMemorySessionStore(**options) if backend == "memory" else SQLSessionStore(
            backend_url(backend, tmp_path), **options)
        made.append(s)
        return s

    yield make
    for s in made:
        if isinstance(s, SQLSessionStore):
            purge_namespace(s, ns)
        s.close()


@pytest.fixture
def store(make_store):
    return make_store()


def rows(store, pk_of: str, ns: str) -> dict[str, int] | None:
    """Rows per table of a session by direct SQL (None on the in-memory store, which has no rows)."""
    if not isinstance(store, SQLSessionStore):
        return None
    return row_counts(store.engine, session_pk(store.engine, ns, pk_of))


def test_is_a_session_store(store):
    assert isinstance(store, SessionStore)


# ---------------------------------------------------------------------------------------------- create / get
def test_create_get_exists(store, ns):
    assert not store.exists("s1", namespace=ns)
    info = new_session(store, ns, metadata={"user": "ada", "tags": ["a", 1]})
    assert (info.session_id, info.namespace, info.version, info.turn) == ("s1", ns, 1, 0)
    assert (info.model_fingerprint, info.adapter_fingerprint) == ("model-fp", "adapter-fp")
    assert info.metadata == {"user": "ada", "tags": ["a", 1]}
    assert info.created_at.tzinfo is UTC and info.updated_at == info.created_at
    assert store.get("s1", namespace=ns) == info
    assert store.exists("s1", namespace=ns)
    assert not store.exists("s1", namespace=ns + "x")

    fresh = store.load("s1", namespace=ns)
    assert (fresh.turn, fresh.state, fresh.written, fresh.window) == (0, [], None, [])  # the record: on request
    assert (fresh.record.count, fresh.record.tokens, fresh.record.first_digest) == (0, 0, "")
    assert store.load("s1", namespace=ns, full_record=True).written == []
    assert [t.turn for t in store.list_turns("s1", namespace=ns)] == [0]


def test_same_id_in_two_namespaces(store, ns):
    new_session(store, ns)
    new_session(store, ns + "-b")
    try:
        assert store.get("s1", namespace=ns).namespace == ns
        assert store.get("s1", namespace=ns + "-b").namespace == ns + "-b"
    finally:
        store.delete("s1", namespace=ns + "-b")


def test_list_sessions_order_filter_pagination(store, ns):
    other = ns + "-other"
    for i in range(5):
        new_session(store, ns, f"s{i}")
    new_session(store, other, "x")
    try:
        time.sleep(0.01)
        commit_turns(store, ns, "s1", 1)  # the most recently updated comes first
        listed = [i.session_id for i in store.list_sessions(namespace=ns)]
        assert listed == ["s1", "s4", "s3", "s2", "s0"]

        pages = [store.list_sessions(namespace=ns, limit=2, offset=o) for o in (0, 2, 4, 6)]
        assert [[i.session_id for i in page] for page in pages] == [["s1", "s4"], ["s3", "s2"], ["s0"], []]
        assert store.list_sessions(namespace=ns, limit=0) == []

        everywhere = {(i.namespace, i.session_id) for i in store.list_sessions(namespace=None, limit=10_000)}
        assert {(ns, f"s{i}") for i in range(5)} | {(other, "x")} <= everywhere
        assert [i.session_id for i in store.list_sessions(namespace=other)] == ["x"]
        with pytest.raises(ValueError):
            store.list_sessions(namespace=ns, limit=-1)
    finally:
        store.delete("x", namespace=other)


# ---------------------------------------------------------------------------------------------- commit / load
def test_commit_and_load_are_bit_identical(store, ns):
    info = new_session(store, ns)
    state = [
        blob("a", "float32", (1, 8, 8), seed=1),
        blob("b", "bfloat16", (4, 8, 8), seed=2),
        blob("c", "float16", (3,), seed=3),
        blob("d", "float64", (), seed=4),  # a scalar
        blob("e", "int64", (2, 0), seed=5),  # empty
        blob("f", "int32", (5, 1), seed=6),
    ]
    after = store.commit("s1", namespace=ns, expected_version=info.version, state=state, written=written(0, 1),
                         window=window(0, 1))
    assert (after.version, after.turn) == (2, 1)
    assert after.updated_at >= info.updated_at and after.created_at == info.created_at

    data = store.load("s1", namespace=ns, full_record=True)
    assert data.turn == 1 and data.info == after
    assert [(b.name, b.dtype, b.shape, b.data) for b in data.state] == [(b.name, b.dtype, b.shape, b.data) for b in state]
    assert all(isinstance(b.data, bytes) and b.checksum == sha256_hex(b.data) for b in data.state)
    assert data.written == written(0, 1)
    assert data.window == window(0, 1)
    assert data.record == RecordSummary.of(written(0, 1))
    lean = store.load("s1", namespace=ns)  # what a turn loads: everything but the record itself
    assert (lean.state, lean.window, lean.record, lean.written) == (data.state, data.window, data.record, None)


def test_written_record_is_cumulative_and_window_per_turn(store, ns):
    new_session(store, ns)
    commit_turns(store, ns, "s1", 4)
    for k in range(5):
        data = store.load("s1", namespace=ns, turn=k, full_record=True)
        assert data.turn == k
        assert [w.index for w in data.written] == list(range(k))
        assert data.record == RecordSummary.of(data.written)
        assert [w.index for w in data.window] == ([k - 1] if k else [])
        assert [b.data for b in data.state] == ([blob(seed=k).data, blob("layer1", seed=-k).data] if k else [])
    turns = store.list_turns("s1", namespace=ns)
    assert [(t.turn, t.written_count) for t in turns] == [(k, k) for k in range(5)]
    assert [t.state_bytes for t in turns] == [0] + [2 * 256] * 4


def test_commit_with_checksum_given(store, ns):
    info = new_session(store, ns)
    b = blob()
    good = TensorBlob(b.name, b.dtype, b.shape, b.data, sha256_hex(b.data).upper())
    store.commit("s1", namespace=ns, expected_version=info.version, state=[good], written=[], window=[])
    assert store.load("s1", namespace=ns).state[0].checksum == sha256_hex(b.data)


def test_commit_on_earlier_base_turn_replays(store, ns):
    new_session(store, ns)
    info = commit_turns(store, ns, "s1", 3)
    replay = store.commit("s1", namespace=ns, expected_version=info.version, state=[blob(seed=99)],
                          written=written(1, tag="other"), window=[], base_turn=1)
    assert (replay.turn, replay.version) == (2, info.version + 1)
    data = store.load("s1", namespace=ns, full_record=True)
    assert data.written == [*written(0), *written(1, tag="other")]
    assert data.record == RecordSummary.of(data.written)
    assert data.state[0].data == blob(seed=99).data
    assert [t.turn for t in store.list_turns("s1", namespace=ns)] == [0, 1, 2]
    with pytest.raises(SessionNotFoundError):
        store.commit("s1", namespace=ns, expected_version=replay.version, state=[], written=[], window=[],
                     base_turn=5)


def test_rollback(store, ns):
    new_session(store, ns)
    info = commit_turns(store, ns, "s1", 4)
    back = store.rollback("s1", namespace=ns, turn=2, expected_version=info.version)
    assert (back.turn, back.version) == (2, info.version + 1)
    data = store.load("s1", namespace=ns)
    assert data.turn == 2 and indexes(store, ns, "s1") == [0, 1] and data.record.count == 2
    assert [t.turn for t in store.list_turns("s1", namespace=ns)] == [0, 1, 2]
    with pytest.raises(SessionNotFoundError):
        store.load("s1", namespace=ns, turn=3)
    # A commit after the rollback continues from turn 2 and reuses the freed turn numbers.
    again = commit_turns(store, ns, "s1", 1, tag="again")
    assert again.turn == 3 and store.load("s1", namespace=ns, full_record=True).written == [
        *written(0, 1), *written(2, tag="again")]

    before = snapshot_of(store, ns, "s1")
    for bad in (7, -1):
        with pytest.raises(SessionNotFoundError):
            store.rollback("s1", namespace=ns, turn=bad)
    with pytest.raises(ConcurrentUpdateError):
        store.rollback("s1", namespace=ns, turn=0, expected_version=back.version)
    assert snapshot_of(store, ns, "s1") == before
    assert store.rollback("s1", namespace=ns, turn=0).turn == 0  # expected_version=None: unconditional


def test_reset(store, ns):
    info = new_session(store, ns, metadata={"keep": True})
    info = commit_turns(store, ns, "s1", 3)
    with pytest.raises(ConcurrentUpdateError):
        store.reset("s1", namespace=ns, expected_version=info.version - 1)
    fresh = store.reset("s1", namespace=ns, expected_version=info.version)
    assert (fresh.turn, fresh.version, fresh.metadata) == (0, info.version + 1, {"keep": True})
    assert fresh.created_at == info.created_at
    data = store.load("s1", namespace=ns, full_record=True)
    assert (data.turn, data.state, data.written, data.window, data.record.count) == (0, [], [], [], 0)
    assert rows(store, "s1", ns) in (None, {"sessions": 1, "snapshots": 1, "state_tensors": 0, "written_messages": 0,
                                            "window_messages": 0})


def test_fork(store, ns):
    new_session(store, ns, metadata={"m": 1})
    commit_turns(store, ns, "s1", 3)
    before = snapshot_of(store, ns, "s1")

    full = store.fork("s1", "copy", namespace=ns)
    assert (full.turn, full.version, full.metadata) == (3, 1, {"m": 1})
    assert store.load("copy", namespace=ns).state == store.load("s1", namespace=ns).state
    assert [t.turn for t in store.list_turns("copy", namespace=ns)] == [0, 1, 2, 3]

    early = store.fork("s1", "early", namespace=ns, new_namespace=ns + "-b", turn=1)
    try:
        assert early.namespace == ns + "-b" and early.turn == 1
        data = store.load("early", namespace=ns + "-b")
        assert indexes(store, ns + "-b", "early") == [0] and data.state[0].data == blob(seed=1).data
        assert [t.turn for t in store.list_turns("early", namespace=ns + "-b")] == [0, 1]
        # The fork lives its own life; the source is untouched throughout.
        commit_turns(store, ns + "-b", "early", 2, tag="fork")
        assert snapshot_of(store, ns, "s1") == before
    finally:
        store.delete("early", namespace=ns + "-b")

    with pytest.raises(SessionExistsError):
        store.fork("s1", "copy", namespace=ns)
    with pytest.raises(SessionNotFoundError):
        store.fork("s1", "later", namespace=ns, turn=9)
    with pytest.raises(SessionNotFoundError):
        store.fork("nope", "x", namespace=ns)
    assert not store.exists("later", namespace=ns) and not store.exists("x", namespace=ns)
    assert snapshot_of(store, ns, "s1") == before


def test_delete_removes_every_row(store, ns):
    new_session(store, ns)
    commit_turns(store, ns, "s1", 3)
    new_session(store, ns, "other")
    commit_turns(store, ns, "other", 1)
    sql = isinstance(store, SQLSessionStore)
    if sql:
        pk, other_pk = session_pk(store.engine, ns, "s1"), session_pk(store.engine, ns, "other")
        assert all(n > 0 for n in row_counts(store.engine, pk).values())

    store.delete("s1", namespace=ns)
    if sql:
        assert row_counts(store.engine, pk) == dict.fromkeys(TABLES, 0)
    assert not store.exists("s1", namespace=ns)
    with pytest.raises(SessionNotFoundError):
        store.get("s1", namespace=ns)
    with pytest.raises(SessionNotFoundError):
        store.delete("s1", namespace=ns)
    if sql:
        assert all(n > 0 for n in row_counts(store.engine, other_pk).values())  # the neighbour is intact
    assert store.load("other", namespace=ns).record.count == 1
    # The id is free again, and the new session starts from scratch.
    assert new_session(store, ns).turn == 0
    assert store.load("s1", namespace=ns, full_record=True).written == []


def test_stats(store, ns):
    new_session(store, ns)
    commit_turns(store, ns, "s1", 3)
    stats = store.stats("s1", namespace=ns)
    assert stats.info == store.get("s1", namespace=ns)
    assert (stats.turns, stats.written_messages, stats.window_messages) == (4, 3, 1)
    assert stats.written_tokens == sum(w.tokens for w in written(0, 1, 2))
    assert (stats.state_bytes, stats.stored_bytes) == (512, 3 * 512)


# ---------------------------------------------------------------------------------------------- pruning
def test_max_snapshots_prunes_oldest_keeps_written(make_store, ns):
    with make_store(max_snapshots=3) as store:
        new_session(store, ns)
        commit_turns(store, ns, "s1", 6)
        assert [t.turn for t in store.list_turns("s1", namespace=ns)] == [4, 5, 6]
        data = store.load("s1", namespace=ns, full_record=True)
        assert [w.index for w in data.written] == list(range(6))  # the record outlives pruned snapshots
        assert data.record == RecordSummary.of(data.written)
        assert indexes(store, ns, "s1", turn=4) == [0, 1, 2, 3]
        for gone in (0, 3):
            with pytest.raises(SessionNotFoundError):
                store.load("s1", namespace=ns, turn=gone)
        stats = store.stats("s1", namespace=ns)
        assert (stats.turns, stats.written_messages, stats.stored_bytes) == (3, 6, 3 * 512)

        store.rollback("s1", namespace=ns, turn=4)
        assert indexes(store, ns, "s1") == [0, 1, 2, 3]
        fork = store.fork("s1", "f", namespace=ns)
        assert [t.turn for t in store.list_turns("f", namespace=ns)] == [4]
        assert indexes(store, ns, "f") == [0, 1, 2, 3]
        assert fork.turn == 4
        for sid in ("s1", "f"):
            store.delete(sid, namespace=ns)


def test_max_snapshots_one_keeps_latest(make_store, ns):
    with make_store(max_snapshots=1) as store:
        new_session(store, ns)
        commit_turns(store, ns, "s1", 3)
        assert [t.turn for t in store.list_turns("s1", namespace=ns)] == [3]
        assert store.load("s1", namespace=ns).turn == 3
        store.delete("s1", namespace=ns)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_max_snapshots_must_be_positive(make_store, bad):
    with pytest.raises(ValueError):
        make_store(max_snapshots=bad)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_session(store, ns):
    calls = [
        lambda: store.get("ghost", namespace=ns),
        lambda: store.load("ghost", namespace=ns),
        lambda: store.commit("ghost", namespace=ns, expected_version=1, state=[], written=[], window=[]),
        lambda: store.rollback("ghost", namespace=ns, turn=0),
        lambda: store.reset("ghost", namespace=ns),
        lambda: store.fork("ghost", "new", namespace=ns),
        lambda: store.delete("ghost", namespace=ns),
        lambda: store.list_turns("ghost", namespace=ns),
        lambda: store.stats("ghost", namespace=ns),
    ]
    for call in calls:
        with pytest.raises(SessionNotFoundError, match="ghost"):
            call()
    assert store.list_sessions(namespace=ns) == []


def test_duplicate_create_changes_nothing(store, ns):
    new_session(store, ns, metadata={"first": True})
    commit_turns(store, ns, "s1", 1)
    before = snapshot_of(store, ns, "s1")
    with pytest.raises(SessionExistsError):
        store.create("s1", namespace=ns, model_fingerprint="other", adapter_fingerprint="other")
    assert snapshot_of(store, ns, "s1") == before


BAD_IDS = ["a/b", "a b", "", "x" * 200, "bad\x00id", "tab\tid", "new\nline", "-leading", "ünï", "a\x7f", "trailing\n"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_invalid_identifiers(store, ns, bad):
    new_session(store, ns)
    before = snapshot_of(store, ns, "s1")
    calls = [
        lambda: store.create(bad, namespace=ns, model_fingerprint="m", adapter_fingerprint="a"),
        lambda: store.create("ok", namespace=bad, model_fingerprint="m", adapter_fingerprint="a"),
        lambda: store.get(bad, namespace=ns),
        lambda: store.exists("s1", namespace=bad),
        lambda: store.load(bad, namespace=ns),
        lambda: store.commit(bad, namespace=ns, expected_version=1, state=[], written=[], window=[]),
        lambda: store.fork("s1", bad, namespace=ns),
        lambda: store.fork("s1", "ok", namespace=ns, new_namespace=bad),
        lambda: store.delete(bad, namespace=ns),
        lambda: store.list_sessions(namespace=bad),
    ]
    for call in calls:
        with pytest.raises(InvalidIdentifierError):
            call()
    assert [i.session_id for i in store.list_sessions(namespace=ns)] == ["s1"]
    assert snapshot_of(store, ns, "s1") == before


def test_identifier_limits(store, ns):
    longest = "a" + "b" * 127
    new_session(store, ns, longest)
    new_session(store, ns, "x.y_z:w@v-1")
    assert {i.session_id for i in store.list_sessions(namespace=ns)} == {longest, "x.y_z:w@v-1"}


@pytest.mark.parametrize(
    "bad_blob",
    [
        TensorBlob("s", "float32", (2, 2), b"\x00" * 15),  # one byte short
        TensorBlob("s", "float16", (2, 2), b"\x00" * 16),  # right for float32, wrong for float16
        TensorBlob("s", "complex64", (2,), b"\x00" * 16),  # dtype not allowed
        TensorBlob("s", "uint8", (4,), b"\x00" * 4),
        TensorBlob("s", "float32", (2, -2), b""),
        TensorBlob("s", "float32", (2,), b"\x00" * 8, checksum="0" * 64),  # checksum does not match
        TensorBlob("", "float32", (2,), b"\x00" * 8),
    ],
    ids=["short", "dtype-size", "complex64", "uint8", "negative-dim", "checksum", "no-name"],
)
def test_bad_blob_on_commit_writes_nothing(store, ns, bad_blob):
    new_session(store, ns)
    info = commit_turns(store, ns, "s1", 1)
    before, counts = snapshot_of(store, ns, "s1"), rows(store, "s1", ns)
    with pytest.raises(CorruptStateError):
        # The good blob first: it must not be written either.
        store.commit("s1", namespace=ns, expected_version=info.version, state=[blob(seed=5), bad_blob],
                     written=written(1), window=window(1))
    assert snapshot_of(store, ns, "s1") == before
    assert rows(store, "s1", ns) == counts


def test_malformed_records_on_commit_write_nothing(store, ns):
    info = new_session(store, ns)
    before = snapshot_of(store, ns, "s1")
    for kwargs in (
        {"state": [blob("a"), blob("a")], "written": [], "window": []},  # duplicate tensor name
        {"state": [], "written": written(1, 1), "window": []},  # same index twice in one turn
        {"state": [], "written": written(-1), "window": []},
        {"state": [], "written": [], "window": [("user", "tuple")]},
    ):
        with pytest.raises(CorruptStateError):
            store.commit("s1", namespace=ns, expected_version=info.version, **kwargs)
    with pytest.raises(CorruptStateError):
        store.create("s2", namespace=ns, model_fingerprint="m", adapter_fingerprint="a", metadata={"x": object()})
    assert snapshot_of(store, ns, "s1") == before
    assert not store.exists("s2", namespace=ns)


def test_stale_version_changes_nothing(store, ns):
    info = new_session(store, ns)
    first = store.commit("s1", namespace=ns, expected_version=info.version, state=[blob(seed=1)],
                         written=written(0), window=[])
    before, counts = snapshot_of(store, ns, "s1"), rows(store, "s1", ns)
    for stale in (info.version, first.version + 1, 0):
        with pytest.raises(ConcurrentUpdateError):
            store.commit("s1", namespace=ns, expected_version=stale, state=[blob(seed=2)], written=written(1),
                         window=window(1))
    assert snapshot_of(store, ns, "s1") == before
    assert rows(store, "s1", ns) == counts


# ---------------------------------------------------------------------------------------------- record numbering
@pytest.mark.parametrize("offered", [[2], [1, 3], [2, 1], [0], [5]], ids=["gap", "gap-inside", "order", "repeat",
                                                                             "far"])
def test_a_turn_must_continue_the_record(store, ns, offered):
    """Indexes are positions in the history: a turn on top of n records writes n, n+1, … — a gap or a repeat
    would let two records claim one message (the engine would later write a duplicate)."""
    new_session(store, ns)
    info = commit_turns(store, ns, "s1", 1)  # record: [0]
    before = snapshot_of(store, ns, "s1")
    with pytest.raises(CorruptStateError, match="no gaps"):
        store.commit("s1", namespace=ns, expected_version=info.version, state=[], written=written(*offered),
                     window=[])
    assert snapshot_of(store, ns, "s1") == before
    # on top of an earlier turn the record continues from that turn's count
    store.commit("s1", namespace=ns, expected_version=info.version, state=[], written=written(0, 1, tag="b"),
                 window=[], base_turn=0)
    assert indexes(store, ns, "s1") == [0, 1]


# ---------------------------------------------------------------------------------------------- text
BAD_TEXT = {"nul": "before\x00after", "lone-surrogate": "half \ud800 pair", "lone-low": "\udfff"}


@pytest.mark.parametrize("bad", list(BAD_TEXT))
def test_text_no_backend_can_hold_is_refused_everywhere(store, ns, bad):
    """One behaviour on every backend: PostgreSQL cannot store NUL in text or JSONB, and no UTF-8 database can
    store a lone surrogate; SQLite would take both, so the store refuses them before writing anything."""
    from deltamem_agents.store import WindowMessage, WrittenMessage

    text_ = BAD_TEXT[bad]
    info = new_session(store, ns)
    before = snapshot_of(store, ns, "s1")
    offers = [
        {"written": [], "window": [WindowMessage(0, "user", text_, 3)]},
        {"written": [], "window": [WindowMessage(0, text_, "ok", 3)]},
        {"written": [WrittenMessage(0, "user", text_, 3)], "window": []},
        {"written": [WrittenMessage(0, text_, "d", 3)], "window": []},
    ]
    for offer in offers:
        with pytest.raises(CorruptStateError, match="NUL|surrogate"):
            store.commit("s1", namespace=ns, expected_version=info.version, state=[], **offer)
    for kwargs in ({"metadata": {"k": text_}}, {"metadata": {text_: 1}}, {"metadata": {"l": [{"x": text_}]}},
                   {"model_fingerprint": text_}, {"adapter_fingerprint": text_}):
        kwargs = {"model_fingerprint": "m", "adapter_fingerprint": "a", **kwargs}
        with pytest.raises(CorruptStateError, match="NUL|surrogate"):
            store.create("s2", namespace=ns, **kwargs)
    assert snapshot_of(store, ns, "s1") == before
    assert not store.exists("s2", namespace=ns)
