"""Typed errors instead of raw driver errors: a file that is not a database, an unreachable or missing
PostgreSQL database, a full disk. Each on the sync and the async store, and through ``upgrade``."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from deltamem_agents.errors import DeltaMemError
from deltamem_agents.store import (
    SQLSessionStore,
    StorageFullError,
    StoreError,
    StoreUnavailableError,
    TensorBlob,
    open_async_store,
    upgrade,
)
from deltamem_agents.store.connect import translate_error

from ._helpers import commit_turns, new_session, row_counts, session_pk, written
from .conftest import postgres_url


def _open_async(url: str):
    async def run():
        store = await open_async_store(url)
        await store.close()

    asyncio.run(run())


def _opening(url: str):
    """Every way of opening a store at ``url``: sync, async, and the migration entry point."""
    return [lambda: SQLSessionStore(url).close(), lambda: _open_async(url), lambda: upgrade(url)]


def test_every_store_error_has_one_root():
    for cls in (StoreUnavailableError, StorageFullError, StoreError):
        assert issubclass(cls, DeltaMemError)
    assert issubclass(StorageFullError, StoreUnavailableError)


def test_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 50)
    before = path.read_bytes()
    for open_ in _opening(str(path)):
        with pytest.raises(StoreUnavailableError, match="not an SQLite database"):
            open_()
    assert path.read_bytes() == before  # untouched


def test_a_path_whose_directory_cannot_exist(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for open_ in _opening(str(blocker / "sessions.db")):
        with pytest.raises(StoreUnavailableError, match="cannot create the directory"):
            open_()


def test_an_unreachable_server():
    url = "postgresql://postgres@127.0.0.1:1/nothing"  # port 1: connection refused
    for open_ in _opening(url):
        with pytest.raises(StoreUnavailableError, match="127.0.0.1:1") as caught:
            open_()
        assert "Traceback" not in str(caught.value)


def test_a_missing_database_on_a_live_server():
    url = make_url(postgres_url()).set(database="deltamem_no_such_db_here").render_as_string(hide_password=False)
    for open_ in _opening(url):
        with pytest.raises(StoreUnavailableError, match="does not exist"):
            open_()


# ---------------------------------------------------------------------------------------------- disk full
def _cap_pages(sync_engine, limit: int) -> None:
    """Cap the SQLite file at ``limit`` pages on every new connection (PRAGMA max_page_count): the database then
    fails writes exactly as on a full disk (SQLITE_FULL, "database or disk is full")."""

    @event.listens_for(sync_engine, "connect")
    def _cap(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()  # the same call on sqlite3 and on aiosqlite's adapter
        cursor.execute(f"PRAGMA max_page_count = {limit}")
        cursor.close()


def _pages(store) -> int:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA page_count").scalar()


def _big_state(seed: int) -> list[TensorBlob]:
    return [TensorBlob("big", "float32", (32, 1024), os.urandom(4 * 32 * 1024))]  # 128 KiB: 32+ pages


def test_disk_full_is_typed_and_writes_nothing(tmp_path, ns):
    path = str(tmp_path / "full.db")
    with SQLSessionStore(path) as store:
        new_session(store, ns)
        info = commit_turns(store, ns, "s1", 2)
        before, counts = store.load("s1", namespace=ns, full_record=True), row_counts(
            store.engine, session_pk(store.engine, ns, "s1"))
        _cap_pages(store.engine, _pages(store) + 4)
        store.engine.dispose()  # pooled connections were opened without the cap
        with pytest.raises(StorageFullError, match="database or disk is full"):
            store.commit("s1", namespace=ns, expected_version=info.version, state=_big_state(1),
                         written=written(2), window=[])
        with pytest.raises(StorageFullError):
            new_session(store, ns, "s2", metadata={"pad": "x" * 200_000})
        # Reads keep working, and the failed writes left nothing behind.
        assert store.load("s1", namespace=ns, full_record=True) == before
        assert row_counts(store.engine, session_pk(store.engine, ns, "s1")) == counts
        assert not store.exists("s2", namespace=ns)
    with SQLSessionStore(path) as store:  # room again: the same commit goes through
        store.commit("s1", namespace=ns, expected_version=info.version, state=_big_state(1), written=written(2),
                     window=[])
        assert store.load("s1", namespace=ns).record.count == 3


def test_disk_full_on_the_async_store(tmp_path, ns):
    path = str(tmp_path / "full.db")
    with SQLSessionStore(path) as store:
        new_session(store, ns)
        info = store.get("s1", namespace=ns)
        limit = _pages(store) + 4

    async def run():
        store = await open_async_store(path)
        try:
            _cap_pages(store.engine.sync_engine, limit)
            await store.engine.dispose()
            with pytest.raises(StorageFullError):
                await store.commit("s1", namespace=ns, expected_version=info.version, state=_big_state(2),
                                   written=written(0), window=[])
            assert (await store.get("s1", namespace=ns)).version == info.version
        finally:
            await store.engine.dispose()

    asyncio.run(run())


def test_postgresql_disk_full_maps_to_storage_full():
    """PostgreSQL reports a full disk as SQLSTATE 53100; the mapping is our logic, tested on psycopg's own
    error class (filling a real server's disk is not something a test may do to a shared server)."""
    import psycopg

    wrapped = OperationalError("INSERT …", {}, psycopg.errors.DiskFull("could not extend file: No space left"))
    assert isinstance(translate_error(wrapped, "pg"), StorageFullError)
    refused = OperationalError("connect", {}, psycopg.OperationalError("connection refused"))
    assert isinstance(translate_error(refused, "pg", connecting=True), StoreUnavailableError)
    full = OperationalError("INSERT …", {}, sqlite3.OperationalError("database or disk is full"))
    assert isinstance(translate_error(full, "db"), StorageFullError)
