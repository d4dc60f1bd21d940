"""Database URLs and engines: one place that knows SQLite's and PostgreSQL's connection quirks.

Accepted URLs (sync and async stores accept the same ones and pick their own driver):

* ``None``                      the SQLite file ``cache_dir()/sessions.db`` (its directory is created);
* ``sqlite:///path/to.db``      (also ``sqlite+pysqlite://``, ``sqlite+aiosqlite://``), or a bare file path;
* ``sqlite://`` / ``sqlite:///:memory:``  a private in-memory database (one shared connection; for tests);
* ``postgresql://…``            (also ``postgres://``, ``postgresql+psycopg://``, ``postgresql+asyncpg://``).

Sync stores use ``pysqlite`` and ``psycopg`` (3); async stores use ``aiosqlite`` and ``asyncpg`` (an explicit
``postgresql+psycopg://`` is kept for async too: psycopg 3 is async-capable).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:  # sqlalchemy.ext.asyncio needs greenlet; the sync store must work without it
    from sqlalchemy.ext.asyncio import AsyncEngine

from ..paths import cache_dir

#: Execution option that marks a connection's next transaction as a write (SQLite: ``BEGIN IMMEDIATE``).
WRITE_OPTION = "deltamem_write"

DEFAULT_SQLITE_FILENAME = "sessions.db"

_SYNC_DRIVERS = {"sqlite": "sqlite+pysqlite", "postgresql": "postgresql+psycopg"}
_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
# Drivers a user may name explicitly and that we keep as given, per mode.
_KEEP_SYNC = {"sqlite+pysqlite", "postgresql+psycopg", "postgresql+psycopg2", "postgresql+pg8000"}
_KEEP_ASYNC = {"sqlite+aiosqlite", "postgresql+asyncpg", "postgresql+psycopg"}


def default_sqlite_path() -> Path:
    """Where a store opened without a URL keeps its database."""
    return cache_dir() / DEFAULT_SQLITE_FILENAME


def normalize_url(url: str | URL | None, *, async_: bool = False) -> URL:
    """Turn what a user passed into a SQLAlchemy URL with the driver this store uses.

    Raises :class:`ValueError` for a database other than SQLite or PostgreSQL.
    """
    if url is None:
        path = default_sqlite_path()
        url = URL.create("sqlite", database=str(path))
    elif isinstance(url, str) and "://" not in url:
        url = URL.create("sqlite", database=str(Path(url).expanduser()))  # a bare path means an SQLite file
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgres":  # Heroku-style alias
        backend = "postgresql"
    if backend not in _SYNC_DRIVERS:
        raise ValueError(
            f"unsupported database {parsed.render_as_string(hide_password=True)!r}: "
            "use an sqlite:// or postgresql:// URL"
        )
    name = parsed.drivername if parsed.drivername != "postgres" else "postgresql"
    keep, default = (_KEEP_ASYNC, _ASYNC_DRIVERS) if async_ else (_KEEP_SYNC, _SYNC_DRIVERS)
    if name not in keep:
        name = default[backend]
    return parsed.set(drivername=name)


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _prepare_sqlite_file(url: URL) -> None:
    if not is_memory_sqlite(url) and not str(url.database).startswith("file:"):
        Path(str(url.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _install_sqlite_hooks(sync_engine: Engine, busy_timeout_s: float) -> None:
    """Take SQLite's transactions out of the driver's hands.

    ``sqlite3`` (and aiosqlite on top of it) open transactions lazily and only before DML, which breaks
    transactional DDL and makes the lock a write needs arrive late (a deadlock-prone upgrade from a read lock).
    The SQLAlchemy-documented recipe: put the driver in autocommit mode and emit ``BEGIN`` ourselves, as
    ``BEGIN IMMEDIATE`` for writes so the write lock is taken up front and concurrent writers queue on
    ``busy_timeout`` instead of failing with "database is locked" halfway through.
    """
    memory = is_memory_sqlite(sync_engine.url)

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not memory:
                _enable_wal(cursor, busy_timeout_s)
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _enable_wal(cursor: Any, busy_timeout_s: float) -> None:
    """Put the file in WAL mode (readers never block the writer and vice versa; the mode is persistent).

    Switching needs an exclusive lock, and SQLite answers "database is locked" at once, without its busy
    handler, while another connection holds one — as when several processes open a new database together. So
    the switch is made only when the file is not in WAL mode yet, retrying with back-off up to the busy timeout.
    """
    # execute() and fetchone() are separate calls: aiosqlite's adapted cursor does not return itself.
    cursor.execute("PRAGMA journal_mode")
    row = cursor.fetchone()
    if row is not None and str(row[0]).lower() == "wal":
        return
    deadline = time.monotonic() + busy_timeout_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as error:  # sqlite3.OperationalError, possibly re-raised by an async adapter
            if "locked" not in str(error) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _engine_kwargs(url: URL) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        if is_memory_sqlite(url):
            # One connection shared by every caller, or each connection would see its own empty database.
            return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        return {}
    return {"pool_pre_ping": True}


def make_engine(url: str | URL | None, *, busy_timeout_s: float = 30) -> Engine:
    """A sync engine for ``url`` (normalised), with the SQLite hooks installed."""
    from sqlalchemy import create_engine

    normalized = normalize_url(url, async_=False)
    if normalized.get_backend_name() == "sqlite":
        _prepare_sqlite_file(normalized)
    engine = create_engine(normalized, **_engine_kwargs(normalized))
    if normalized.get_backend_name() == "sqlite":
        _install_sqlite_hooks(engine, busy_timeout_s)
    return engine


def make_async_engine(url: str | URL | None, *, busy_timeout_s: float = 30) -> AsyncEngine:
    """An async engine for ``url`` (normalised), with the SQLite hooks installed on its sync core."""
    from sqlalchemy.ext.asyncio import create_async_engine  # needs greenlet (``sqlalchemy[asyncio]``)

    normalized = normalize_url(url, async_=True)
    if normalized.get_backend_name() == "sqlite":
        _prepare_sqlite_file(normalized)
    engine = create_async_engine(normalized, **_engine_kwargs(normalized))
    if normalized.get_backend_name() == "sqlite":
        _install_sqlite_hooks(engine.sync_engine, busy_timeout_s)
    return engine
