"""Issue 13: several clients on one session lose nothing. Every acknowledged turn of every client is in the
session's record, in commit order, exactly once; every call that cannot be honoured fails with the typed
:class:`HistoryConflictError` before anything is generated or written; ``replayed`` is reported truthfully,
also when a turn was planned again after a concurrent commit.

In one process (two clients alternating) and in two OS processes hammering one session, on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import uuid

import pytest
from engine_helpers import conversation

from deltamem_agents.engine import ConcurrentUpdateError, HistoryConflictError
from deltamem_agents.engine.messages import normalize_message
from deltamem_agents.store import SQLSessionStore
from deltamem_agents.store.memory import InMemorySessionStore

BACKENDS = ("sqlite", "postgresql")


def _postgres_url() -> str:
    url = os.environ.get("DELTAMEM_TEST_POSTGRES_URL", "").strip()
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail("CI must run the PostgreSQL cases: set $DELTAMEM_TEST_POSTGRES_URL")
    pytest.skip("PostgreSQL cases need $DELTAMEM_TEST_POSTGRES_URL")


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    return str(tmp_path / "sessions.db") if request.param == "sqlite" else _postgres_url()


@pytest.fixture
def ns(url):
    """A namespace of this test only, purged afterwards (a shared PostgreSQL database stays small)."""
    namespace = f"shared-{uuid.uuid4().hex[:10]}"
    yield namespace
    with SQLSessionStore(url) as store:
        for info in store.list_sessions(namespace=namespace, limit=1000):
            store.delete(info.session_id, namespace=namespace)


def _record(store, session_id, namespace="default") -> list[str]:
    data = store.load(session_id, namespace=namespace, full_record=True)
    assert [w.index for w in data.written] == list(range(len(data.written)))
    return [w.digest for w in data.written]


def _digests(*messages) -> list[str]:
    return [normalize_message(m).digest for m in messages]


# ---------------------------------------------------------------------------------------------- one process
class _Client:
    """A chat client with its own view of the conversation (it never re-reads the session)."""

    def __init__(self, engine, name: str, style: str) -> None:
        self.engine, self.name, self.style = engine, name, style
        self.history: list[dict] = []
        self.acked: list[tuple[int, list[str]]] = []  # (turn, digests of the messages it added)
        self.conflicts = 0

    def turn(self, i: int, **kwargs) -> None:
        user = {"role": "user", "content": f"{self.name} message {i}"}
        try:
            r = self.engine.chat("s", [*self.history, user], history=self.style, max_new_tokens=2, **kwargs)
        except HistoryConflictError:
            self.conflicts += 1
            return
        reply = {"role": "assistant", "content": r.text}
        assert not r.replayed
        self.history += [user, reply]
        self.acked.append((r.turn, _digests(user, reply)))


@pytest.mark.parametrize("style", ["full", "auto"])
def test_two_clients_alternating_lose_nothing(make_engine, url, ns, style):
    """Before: two clients alternating on one session kept 0 of client A's turns (``full``: each call rolled
    back the other's), and ``auto`` appended whole histories again. Now a client whose view lacks the other's
    messages gets the typed conflict; everything acknowledged stays, once."""
    store = SQLSessionStore(url)
    try:
        eng = make_engine(store=store, namespace=ns)
        a, b = _Client(eng, "A", style), _Client(eng, "B", style)
        for i in range(5):
            a.turn(i)
            b.turn(i)
        acked = sorted(a.acked + b.acked)
        assert a.acked and len(acked) + a.conflicts + b.conflicts == 10
        assert a.conflicts + b.conflicts > 0  # the views really collided
        assert _record(store, "s", ns) == [d for _, ds in acked for d in ds]  # all acknowledged, once, in order
        assert len({t for t, _ in acked}) == len(acked)
    finally:
        store.close()


def test_two_appending_clients_interleave(make_engine, url, ns):
    """``history="append"``: a shared log; both clients' messages interleave and nothing is lost."""
    store = SQLSessionStore(url)
    try:
        eng = make_engine(store=store, namespace=ns)
        expected = []
        for i in range(4):
            for name in ("A", "B"):
                user = {"role": "user", "content": f"{name} {i}"}
                r = eng.chat("s", [user], history="append", max_new_tokens=2)
                expected += _digests(user, {"role": "assistant", "content": r.text})
        assert _record(store, "s", ns) == expected
    finally:
        store.close()


def test_auto_never_appends_a_resent_history(make_engine):
    """The 136-records bug: ``auto`` took a resent history whose first message was not the session's first
    for new messages and appended it again. A view that ends with what the session ends with (the client's
    own turns, or a trimmed history) extends the session; one that does not is a conflict."""
    eng = make_engine()
    sys_ = {"role": "system", "content": "Be brief."}
    eng.write("s", [sys_, {"role": "user", "content": "A1"}, {"role": "assistant", "content": "rA1"}])
    b_hist = [{"role": "user", "content": "B1"}, {"role": "assistant", "content": "rB1"}]
    eng.write("s", b_hist[:1])  # single message, first not the session's: appended
    eng.write("s", b_hist)  # B resends: only its new message is written
    assert eng.stats("s").written_messages == 5
    w = eng.write("s", [*b_hist, {"role": "user", "content": "B2"}])
    assert w.written_messages == 1 and eng.stats("s").written_messages == 6
    # trimmed: the system message kept, the middle left out, the end as committed
    w = eng.write("s", [sys_, b_hist[1], {"role": "user", "content": "B2"}, {"role": "assistant", "content": "x"}])
    assert w.written_messages == 1 and eng.stats("s").written_messages == 7
    version = eng.get_session("s").version
    with pytest.raises(HistoryConflictError) as exc:  # A's stale view: B's messages are missing from it
        eng.chat("s", [sys_, {"role": "user", "content": "A1"}, {"role": "assistant", "content": "rA1"},
                       {"role": "user", "content": "A2"}], max_new_tokens=2)
    assert exc.value.common_prefix == 3 and exc.value.missing == 4 and exc.value.version == version
    assert eng.get_session("s").version == version and eng.stats("s").written_messages == 7


def test_rollback_with_expected_version(make_engine):
    """``on_divergence="rollback"`` replaces what the session holds (edits, "regenerate"); ``expected_version``
    makes that safe against another writer: if the session moved past the version the caller saw, conflict."""
    eng = make_engine()
    msgs = conversation(2)
    r = eng.chat("s", msgs[:2], max_new_tokens=2)
    seen = r.version
    assert seen == eng.get_session("s").version
    other = eng.chat("s", [{"role": "user", "content": "another writer"}], history="append", max_new_tokens=2)
    regenerate = msgs[:2]  # the first question again: replaces the reply (and the other writer's turn)
    with pytest.raises(HistoryConflictError) as exc:
        eng.chat("s", regenerate, on_divergence="rollback", expected_version=seen, max_new_tokens=2)
    assert exc.value.expected_version == seen and exc.value.version == other.version
    assert eng.get_session("s").version == other.version  # nothing written
    r = eng.chat("s", regenerate, on_divergence="rollback", expected_version=other.version, max_new_tokens=2)
    assert r.replayed and r.rolled_back_to == 0 and eng.stats("s").written_messages == 3
    # expected_version is a precondition of any call, and a new session is at version 0
    with pytest.raises(HistoryConflictError):
        eng.write("s", [{"role": "user", "content": "x"}], history="append", expected_version=r.version - 1)
    assert eng.write("new", msgs[:1], expected_version=0).version == 2
    with pytest.raises(HistoryConflictError):
        eng.write("other-new", msgs[:1], expected_version=3)
    assert not eng.store.exists("other-new")


class _Racing(InMemorySessionStore):
    """Another writer commits ``race`` (records of its own) into session ``s`` right before our next commit."""

    def __init__(self) -> None:
        super().__init__()
        self.race: list | None = None

    def commit(self, session_id, **kw):
        if self.race is not None and session_id == "s":
            race, self.race = self.race, None
            data = self.load("s", full_record=True)
            from deltamem_agents.store import WrittenMessage

            written = [WrittenMessage(data.record.count + i, m.role, m.digest, 3) for i, m in enumerate(race)]
            super().commit("s", expected_version=data.info.version, state=data.state, written=written, window=[])
        return super().commit(session_id, **kw)


def _normalized(*msgs):
    return [normalize_message(m) for m in msgs]


def test_a_retry_after_a_concurrent_commit_plans_with_the_same_rules(make_engine):
    """Before: the retry rolled the session back (a full history that no longer matched) and reported
    ``replayed=False``. Now the retry plans again: an append follows the other writer, a full history that
    now diverges is a conflict (nothing of ours written), and with ``rollback`` the replay is reported."""
    store = _Racing()
    eng = make_engine(store=store)
    msgs = conversation(1)
    eng.write("s", msgs)
    theirs = _normalized({"role": "user", "content": "theirs"})

    # append: our message and reply follow theirs
    store.race = theirs
    mine = {"role": "user", "content": "mine"}
    r = eng.chat("s", [mine], history="append", max_new_tokens=2)
    assert not r.replayed and r.written_messages == 2
    assert _record(store, "s")[-3:] == [theirs[0].digest, *_digests(mine, {"role": "assistant", "content": r.text})]

    # full, reject: our history misses their message now → conflict at the retry, nothing of ours written
    history = [*msgs, theirs[0].to_template(), mine, {"role": "assistant", "content": r.text}]
    before = _record(store, "s")
    store.race = _normalized({"role": "user", "content": "theirs again"})
    with pytest.raises(HistoryConflictError):
        eng.chat("s", [*history, {"role": "user", "content": "next"}], history="full", max_new_tokens=2)
    assert _record(store, "s") == [*before, normalize_message({"role": "user", "content": "theirs again"}).digest]

    # full, rollback: the first plan extends the session (no replay); at the retry the history diverges from
    # what the other writer added, so the retry rolls back and replays — and the result says so
    history = [*history, {"role": "user", "content": "theirs again"}]
    before = _record(store, "s")
    store.race = _normalized({"role": "user", "content": "and again"})
    nxt = {"role": "user", "content": "next"}
    r = eng.chat("s", [*history, nxt], history="full", on_divergence="rollback", max_new_tokens=2)
    assert r.replayed and r.rolled_back_to == len(store.list_turns("s")) - 2
    assert _record(store, "s") == [*before, *_digests(nxt, {"role": "assistant", "content": r.text})]


def test_expected_version_and_a_commit_during_the_call(make_engine):
    """With ``expected_version`` a concurrent commit during the call is a conflict (not planned again), with the
    session's new version in the error; nothing of the call is written."""
    store = _Racing()
    eng = make_engine(store=store)
    r = eng.chat("s", conversation(1), max_new_tokens=2)
    store.race = _normalized({"role": "user", "content": "theirs"})
    with pytest.raises(HistoryConflictError) as exc:
        eng.chat("s", [{"role": "user", "content": "mine"}], history="append", expected_version=r.version,
                 max_new_tokens=2)
    assert exc.value.expected_version == r.version and exc.value.version == r.version + 1
    assert exc.value.version == store.get("s").version
    assert _record(store, "s")[-1] == normalize_message({"role": "user", "content": "theirs"}).digest


def test_a_record_changing_while_it_is_planned_is_planned_again(make_engine):
    """Another writer replaces the latest turn between the load and the read of the full record (the planner
    sees a record that does not match the loaded summary): that raised ``ConcurrentUpdateError`` out of the
    call; now the call is planned again."""

    class Replacing(InMemorySessionStore):
        armed = False
        replaced = 0

        def load(self, session_id, *, full_record=False, **kw):
            if full_record and self.armed:
                self.armed = False
                from deltamem_agents.store import WrittenMessage

                data = super().load(session_id)
                self.rollback(session_id, turn=data.turn - 1)
                info = self.get(session_id)
                extra = WrittenMessage(0, "user", normalize_message({"role": "user", "content": "other"}).digest, 2)
                super().commit(session_id, expected_version=info.version, state=[], written=[extra], window=[])
                self.replaced += 1
            return super().load(session_id, full_record=full_record, **kw)

    store = Replacing()
    eng = make_engine(store=store)
    eng.write("s", conversation(1))
    store.armed = True
    edited = [dict(m) for m in conversation(1)]
    edited[1]["content"] = "edited"  # the divergence is found by reading the full record, replaced meanwhile
    w = eng.write("s", edited, history="full", on_divergence="rollback")
    assert store.replaced == 1 and w.replayed and w.rolled_back_to == 0
    assert _record(store, "s") == _digests(*edited)
    # the same race with no retry allowed surfaces as the typed ConcurrentUpdateError, nothing written
    strict = make_engine(store=store, max_retries=0)
    before = _record(store, "s")
    store.armed = True
    with pytest.raises(ConcurrentUpdateError):
        strict.write("s", conversation(1), history="full", on_divergence="rollback")
    assert store.replaced == 2 and len(_record(store, "s")) == 1 and _record(store, "s") != before


def test_a_failed_concurrent_retry_is_the_store_error(make_engine):
    """Still conflicting after ``max_retries`` plans: the store's ConcurrentUpdateError (typed), nothing kept."""

    class AlwaysRacing(_Racing):
        races = 0

        def commit(self, session_id, **kw):
            self.races += 1
            self.race = _normalized({"role": "user", "content": f"race {self.races}"})
            return super().commit(session_id, **kw)

    store = AlwaysRacing()
    eng = make_engine(store=store, max_retries=2)
    with pytest.raises(ConcurrentUpdateError) as exc:
        eng.write("s", [{"role": "user", "content": "mine"}], history="append")
    assert not isinstance(exc.value, HistoryConflictError)
    assert store.races == 3  # the first commit and two retries
    assert _record(store, "s") == _digests(*({"role": "user", "content": f"race {i}"} for i in (1, 2, 3)))


# ---------------------------------------------------------------------------------------------- two processes
def _run_processes(url: str, namespace: str, kind: str, style: str, tmp_path, turns: int = 6) -> list[dict]:
    from shared_session_worker import run_client

    ctx = multiprocessing.get_context("spawn")
    go = str(tmp_path / "go")
    outs = [str(tmp_path / f"client{c}.json") for c in "AB"]
    procs = [ctx.Process(target=run_client, args=(url, namespace, "s", name, kind, style, turns, 4096, out, go))
             for name, out in zip("AB", outs, strict=True)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    while not all(os.path.exists(o + ".ready") for o in outs):
        assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "clients did not start"
        time.sleep(0.05)
    open(go, "w").close()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"client exited with {p.exitcode}"
    return [json.loads(open(o).read()) for o in outs]


@pytest.mark.parametrize(("kind", "style"), [("resync", "full"), ("resync", "auto"), ("own", "full"),
                                             ("own", "auto")])
def test_two_processes_on_one_session(url, ns, tmp_path, kind, style, tokenizer):
    """Two OS processes send their histories to one session at the same time. At the end the record is
    exactly the acknowledged messages in commit order, with no duplicates; every failure is the typed
    conflict; nothing reports a replay (no client asked for one).

    A typed failure is ``HistoryConflictError`` (the other writer changed the history) or, when the two processes
    keep committing between one's reload and its commit more often than the engine's bounded retries
    (``max_retries``), ``ConcurrentUpdateError``; either way nothing of that call is written (the record check
    below). Which one, and how often, depends on the machine's load: the test does not pin it."""
    reports = _run_processes(url, ns, kind, style, tmp_path)
    acked = sorted((a for r in reports for a in r["acked"]), key=lambda a: a["turn"])
    failures = [f for r in reports for f in r["failures"]]
    assert all(f in ("HistoryConflictError", "ConcurrentUpdateError") for f in failures), failures
    assert acked and all(not a["replayed"] and a["written"] == 2 for a in acked)
    assert [a["turn"] for a in acked] == list(range(1, len(acked) + 1))  # one turn per acknowledged call
    with SQLSessionStore(url) as store:
        record = _record(store, "s", ns)
        assert record == [d for a in acked for d in a["digests"]]
        users = record[::2]  # every user message is unique by construction (replies of the tiny model repeat)
        assert len(set(users)) == len(users)
        assert store.get("s", namespace=ns).version == acked[-1]["version"]
    if kind == "resync":  # both clients make progress: they re-read the conversation after a conflict
        assert all(len(r["acked"]) == 6 for r in reports), [len(r["acked"]) for r in reports]
    print(f"{kind}/{style}: {len(acked)} acknowledged turns, {len(failures)} conflicts")
