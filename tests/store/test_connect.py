"""The shared-database URL of docs/store.md (``?options=-csearch_path%3D…``) on the async store: asyncpg has no
``options``, so the store translates it into asyncpg's ``server_settings``. Tested on a real PostgreSQL schema of
the test's own, with the sync and the async store side by side."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import create_engine, text

from deltamem_agents.store import SQLSessionStore, normalize_url, open_async_store
from deltamem_agents.store.connect import asyncpg_server_settings

from ._helpers import blob, written
from .conftest import postgres_url


@pytest.mark.parametrize(
    ("options", "settings"),
    [
        ("-csearch_path=deltamem", {"search_path": "deltamem"}),
        ("-c search_path=deltamem", {"search_path": "deltamem"}),
        ("--search-path=a,public", {"search_path": "a,public"}),
        ("-c statement_timeout=5000 -csearch_path=x", {"statement_timeout": "5000", "search_path": "x"}),
        ("-c application_name=my\\ app", {"application_name": "my app"}),
        ("", {}),
    ],
)
def test_libpq_options_become_server_settings(options, settings):
    assert asyncpg_server_settings(options) == settings


@pytest.mark.parametrize("options", ["-X", "-c", "-c search_path", "--flag", "trailing\\"])
def test_untranslatable_options_are_refused(options):
    with pytest.raises(ValueError, match="options"):
        asyncpg_server_settings(options)


@pytest.fixture
def schema_url():
    """The recommended URL for a schema of its own on the test server (created here, dropped afterwards)."""
    base = normalize_url(postgres_url())
    schema = f"dm_async_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = base.set(drivername="postgresql").render_as_string(hide_password=False)
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}", schema, admin
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def test_async_store_uses_the_search_path_of_the_url(schema_url):
    """Before: asyncpg raised ``TypeError: connect() got an unexpected keyword argument 'options'``."""
    url, schema, admin = schema_url

    async def run():
        store = await open_async_store(url)  # migrates: the tables must land in the schema
        try:
            info = await store.create("s", namespace="ns", model_fingerprint="m", adapter_fingerprint="a")
            await store.commit("s", namespace="ns", expected_version=info.version, state=[blob()],
                               written=written(0), window=[])
            return await store.load("s", namespace="ns", full_record=True)
        finally:
            await store.close()

    data = asyncio.run(run())
    with admin.connect() as conn:
        tables = set(conn.execute(text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                                  {"s": schema}).scalars())
        in_schema = conn.execute(text(f"SELECT count(*) FROM {schema}.sessions WHERE session_id = 's'")).scalar()
    assert {"sessions", "snapshots", "state_tensors", "written_messages", "window_messages"} <= tables
    assert in_schema == 1
    with SQLSessionStore(url) as sync_store:  # the sync store (psycopg, libpq options) sees the same session
        assert sync_store.load("s", namespace="ns", full_record=True) == data


@pytest.mark.parametrize("content", [b"x", b"hello, not a database\n" * 10])
def test_a_file_that_is_not_a_database_is_refused_and_untouched(tmp_path, content):
    """SQLite takes a non-empty file shorter than its header for an empty database and overwrites it; the store
    refuses any file that does not start with SQLite's header (short or long), and leaves it as it was."""
    from deltamem_agents.store import InvalidStoreURLError, StoreUnavailableError

    path = tmp_path / "notes.db"
    path.write_bytes(content)
    with pytest.raises(StoreUnavailableError, match="not an SQLite database"):
        SQLSessionStore(str(path))
    assert path.read_bytes() == content
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    SQLSessionStore(str(empty)).close()  # an empty file is an empty database
    with pytest.raises(InvalidStoreURLError):
        SQLSessionStore("mysql://u@h/db")
    with pytest.raises(ValueError):  # still a ValueError for older callers
        SQLSessionStore("mysql://u@h/db")
