"""Throwaway sessions: they run on the engine's twin (same model object, private in-memory store, no KV cache)
and leave nothing in the session store — checked on the SQLite file itself — nor in the KV cache directory."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from deltamem_agents.integrations import (
    EPHEMERAL_PREFIX,
    SessionTarget,
    close_ephemeral_engine,
    ephemeral_engine,
    make_ephemeral_engine,
)
from deltamem_agents.store.memory import InMemorySessionStore

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]


def _rows(db: Path) -> dict[str, int]:
    """Row count of every table of the SQLite file."""
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}


def _file_bytes(db: Path) -> bytes:
    """The database file and its write-ahead log (the store runs SQLite in WAL mode: a write changes one of
    them; a read changes neither)."""
    wal = db.with_name(db.name + "-wal")
    return hashlib.sha256(db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")).digest()


def _spy_on_store(engine, monkeypatch) -> list[str]:
    """Record every call of the real store's public methods (the only way the engine reaches the database)."""
    calls: list[str] = []
    for name in dir(type(engine.store)):
        method = getattr(engine.store, name)
        if name.startswith("_") or not callable(method):
            continue

        def spy(*args, _name=name, _method=method, **kwargs):
            calls.append(_name)
            return _method(*args, **kwargs)

        monkeypatch.setattr(engine.store, name, spy)
    return calls


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def test_the_twin_shares_the_model_and_keeps_sessions_in_memory(make_engine):
    engine = make_engine(mode="windowed", window_tokens=128, max_new_tokens=5)
    twin = ephemeral_engine(engine)
    assert ephemeral_engine(engine) is twin  # built once per engine
    assert twin.model is engine.model and twin.tokenizer is engine.tokenizer  # no second copy of the weights
    assert twin.runner.lock is engine.runner.lock  # calls of both still take turns on the model
    assert isinstance(twin.store, InMemorySessionStore) and twin.store is not engine.store
    assert (twin.default_mode, twin.window_tokens, twin.max_new_tokens, twin.sampling) == (
        engine.default_mode, engine.window_tokens, engine.max_new_tokens, engine.sampling)
    assert twin.kv_cache_stats().capacity_bytes == 0  # no KV cache: a throwaway session has no next turn
    close_ephemeral_engine(engine)
    assert ephemeral_engine(engine) is not twin  # a closed twin is forgotten


def test_a_throwaway_call_leaves_nothing_in_the_database_or_cache_dir(make_engine, tmp_path, monkeypatch):
    db, kv_dir = tmp_path / "sessions.db", tmp_path / "kv"
    engine = make_engine(store=f"sqlite:///{db}", mode="online", kv_cache_dir=kv_dir)
    engine.chat("keep", HELLO)  # a named session, so the file has its tables and some rows
    before, before_bytes = _rows(db), _file_bytes(db)
    store_calls = _spy_on_store(engine, monkeypatch)

    target = SessionTarget.resolve(engine, None)
    assert target.ephemeral and target.engine is ephemeral_engine(engine)
    assert target.session_id.startswith(EPHEMERAL_PREFIX) and target.visible_session_id is None
    options = target.call_options("append")
    assert options["history"] == "full"  # a throwaway session is new: the messages are the conversation
    try:
        result = target.engine.chat(target.session_id, HELLO, **options)
    finally:
        target.discard()
    assert result.turn == 1 and result.usage.completion_tokens > 0
    assert target.version(result) is None
    assert target.engine.list_sessions(all_namespaces=True) == []  # deleted from the twin's store too
    assert store_calls == []  # the real store was never asked anything
    assert _file_bytes(db) == before_bytes and _rows(db) == before
    monkeypatch.undo()
    assert [s.session_id for s in engine.list_sessions(all_namespaces=True)] == ["keep"]
    engine.close()  # saves the real engine's hot KV caches, one file per session: only the named session's
    assert len([p for p in _files(kv_dir) if p.suffix == ".safetensors"]) == 1

    # The check can see a write: the same call in a named session adds rows.
    engine2 = make_engine(store=f"sqlite:///{db}", mode="online")
    named = SessionTarget.resolve(engine2, "named")
    result = named.engine.chat(named.session_id, HELLO, **named.call_options("auto"))
    assert _rows(db) != before
    assert named.version(result) == engine2.get_session("named").version


def test_throwaway_calls_from_many_threads(make_engine, tmp_path):
    db = tmp_path / "sessions.db"
    engine = make_engine(store=f"sqlite:///{db}", mode="windowed", window_tokens=128)
    engine.chat("keep", HELLO)
    before = _rows(db)
    texts: list[str] = []
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            target = SessionTarget.resolve(engine, None)
            try:
                msgs = [{"role": "user", "content": f"Question {i}."}]
                texts.append(target.engine.chat(target.session_id, msgs, **target.call_options(None)).text)
            finally:
                target.discard()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(texts) == 4
    assert ephemeral_engine(engine).list_sessions(all_namespaces=True) == []
    assert _rows(db) == before


def test_discarding_a_session_that_never_started_is_quiet(make_engine):
    engine = make_engine()
    target = SessionTarget.resolve(engine, None, namespace="acme")
    target.discard()  # the call was refused before it created anything: nothing to delete, no error
    named = SessionTarget.resolve(engine, "s1")
    named.discard()  # a named session is never deleted by discard
    assert not named.ephemeral and named.visible_session_id == "s1"


def test_the_server_uses_the_same_mechanism():
    pytest.importorskip("fastapi")  # the server's extra
    from deltamem_agents.integrations import new_ephemeral_id
    from deltamem_agents.server import session_choice

    assert session_choice.make_throwaway_engine is make_ephemeral_engine
    assert session_choice.new_throwaway_id is new_ephemeral_id
