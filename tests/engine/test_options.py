"""Issue 13: every bad option is a typed InvalidOptionError naming it (a ValueError under DeltaMemError), refused
before anything runs; a call that fails before its commit creates no session (SQLite and PostgreSQL); a call
with too many messages is refused before any work."""

from __future__ import annotations

import os
import uuid

import pytest

from deltamem_agents.engine import (
    InvalidMessageError,
    InvalidOptionError,
    SamplingParams,
    TooManyMessagesError,
)
from deltamem_agents.errors import DeltaMemError
from deltamem_agents.store import SQLSessionStore, StorageFullError

BACKENDS = ("sqlite", "postgresql")


def _postgres_url() -> str:
    url = os.environ.get("DELTAMEM_TEST_POSTGRES_URL", "").strip()
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail("CI must run the PostgreSQL cases: set $DELTAMEM_TEST_POSTGRES_URL")
    pytest.skip("PostgreSQL cases need $DELTAMEM_TEST_POSTGRES_URL")


@pytest.fixture(params=BACKENDS)
def sql_engine(request, tmp_path, make_engine):
    url = str(tmp_path / "sessions.db") if request.param == "sqlite" else _postgres_url()
    store = SQLSessionStore(url)
    ns = f"opts-{uuid.uuid4().hex[:10]}"
    yield make_engine(store=store, namespace=ns)
    for info in store.list_sessions(namespace=ns, limit=1000):
        store.delete(info.session_id, namespace=ns)
    store.close()


BAD_OPTIONS = [
    ("temperature", {"temperature": float("nan")}),
    ("temperature", {"temperature": float("inf")}),
    ("temperature", {"temperature": -1}),
    ("temperature", {"temperature": "hot"}),
    ("seed", {"seed": 2**70, "temperature": 0.5}),
    ("seed", {"seed": -(2**63) - 1}),
    ("seed", {"seed": 1.5}),
    ("stop", {"stop": 123}),
    ("stop", {"stop": ["ok", ""]}),
    ("stop", {"stop": [b"bytes"]}),
    ("max_new_tokens", {"max_new_tokens": 10**9}),
    ("max_new_tokens", {"max_new_tokens": -1}),
    ("max_new_tokens", {"max_new_tokens": 2.0}),
    ("top_p", {"top_p": 0}),
    ("top_p", {"top_p": 1.5}),
    ("top_p", {"top_p": float("nan")}),
    ("top_k", {"top_k": 0}),
    ("repetition_penalty", {"repetition_penalty": 0}),
    ("repetition_penalty", {"repetition_penalty": float("nan")}),
    ("tools", {"tools": "not a list"}),
    ("tools", {"tools": [1, 2]}),
    ("history", {"history": "everything"}),
    ("on_divergence", {"on_divergence": "ignore"}),
    ("expected_version", {"expected_version": -1}),
    ("create_if_missing", {"create_if_missing": "yes"}),
    ("mode", {"mode": "psychic"}),
]


@pytest.mark.parametrize(("option", "kwargs"), BAD_OPTIONS, ids=[f"{o}-{i}" for i, (o, _) in enumerate(BAD_OPTIONS)])
def test_bad_options_are_typed_and_create_nothing(sql_engine, option, kwargs):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(InvalidOptionError) as exc:
        sql_engine.chat("s", "hello", **kwargs)
    assert exc.value.option == option and option in str(exc.value)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, DeltaMemError)
    assert not sql_engine.store.exists("s", namespace=sql_engine.namespace)
    if option not in ("max_new_tokens", "temperature", "seed", "stop", "top_p", "top_k", "repetition_penalty",
                      "tools"):
        with pytest.raises(InvalidOptionError):
            sql_engine.write("s", "hello", **{k: v for k, v in kwargs.items() if k != "max_new_tokens"})
        assert not sql_engine.store.exists("s", namespace=sql_engine.namespace)


def test_edge_values_are_accepted(make_engine):
    eng = make_engine()
    top = eng.context_window - 1
    for kwargs in ({"seed": 2**64 - 1, "temperature": 0.5}, {"seed": -(2**63), "temperature": 0.5},
                   {"stop": ("a", "b")}, {"tools": []}, {"top_p": 1}, {"temperature": 0}):
        eng.chat(f"s{len(eng.list_sessions())}", "hi", max_new_tokens=1, **kwargs)
    with pytest.raises(InvalidOptionError, match=f"at most {top}"):
        eng.chat("big", "hi", max_new_tokens=top + 1)
    with pytest.raises(InvalidOptionError):
        SamplingParams(temperature=float("nan"))


def test_a_call_failing_before_its_commit_creates_no_session(sql_engine):
    ns = sql_engine.namespace
    # fails after planning, before generating: the turn does not fit the context window
    with pytest.raises(InvalidMessageError):
        sql_engine.chat("s", "word " * 300, max_new_tokens=sql_engine.context_window - 10)
    assert not sql_engine.store.exists("s", namespace=ns)
    # a stream closed early
    stream = sql_engine.stream("s", "Tell me a story.", max_new_tokens=20)
    next(stream)
    stream.close()
    assert not sql_engine.store.exists("s", namespace=ns)
    # bad session ids are refused before anything
    with pytest.raises(DeltaMemError, match="invalid session id"):
        sql_engine.chat("a b", "hi", max_new_tokens=2)
    # …and a call that succeeds creates it
    assert sql_engine.chat("s", "hi", max_new_tokens=2).turn == 1


def test_a_failed_first_commit_removes_the_session_it_created(make_engine):
    from deltamem_agents.store.memory import InMemorySessionStore

    class Full(InMemorySessionStore):
        def commit(self, *a, **k):
            raise StorageFullError("no space left on device (test)")

    eng = make_engine(store=Full())
    with pytest.raises(StorageFullError):
        eng.chat("s", "hi", max_new_tokens=2)
    assert not eng.store.exists("s")


def test_too_many_messages_are_refused_before_any_work(make_engine):
    eng = make_engine(max_messages_per_call=50)
    tokenized = []
    real = eng.renderer.message_ids
    eng.renderer.message_ids = lambda m: tokenized.append(1) or real(m)
    many = [{"role": "user", "content": f"m{i}"} for i in range(51)]
    with pytest.raises(TooManyMessagesError, match="max_messages_per_call=50"):
        eng.write("s", many)
    with pytest.raises(TooManyMessagesError):
        eng.chat("s", iter(many), max_new_tokens=2)  # an iterator is counted after validation, still before tokens
    assert not tokenized and not eng.store.exists("s")
    assert eng.write("s", many[:50]).written_messages == 50
    default = make_engine()
    assert default.max_messages_per_call == 1000
    with pytest.raises(TooManyMessagesError):
        default.write("t", [{"role": "user", "content": "x"}] * 10_000)
    with pytest.raises(InvalidOptionError):
        make_engine(max_messages_per_call=0)
