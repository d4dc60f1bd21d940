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

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:  # sqlalchemy.ext.asyncio needs greenlet; the sync store must work without it
    from sqlalchemy.ext.asyncio import AsyncEngine

from ..extras import require
from ..paths import cache_dir
from .errors import InvalidStoreURLError, StorageFullError, StoreError, StoreUnavailableError

__all__ = [
    "DEFAULT_SQLITE_FILENAME",
    "WRITE_OPTION",
    "asyncpg_server_settings",
    "default_sqlite_path",
    "is_memory_sqlite",
    "make_async_engine",
    "make_engine",
    "normalize_url",
    "translate_error",
    "typed_errors",
]

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

    Raises :class:`InvalidStoreURLError` (a ``ValueError``) for a malformed URL or a database other than SQLite
    or PostgreSQL.
    """
    if url is None:
        path = default_sqlite_path()
        url = URL.create("sqlite", database=str(path))
    elif isinstance(url, str) and "://" not in url:
        url = URL.create("sqlite", database=str(Path(url).expanduser()))  # a bare path means an SQLite file
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidStoreURLError(f"not a database URL: {url!r}: use an sqlite:// or postgresql:// URL, or a file "
                                   "path") from exc
    backend = parsed.get_backend_name()
    if backend == "postgres":  # Heroku-style alias
        backend = "postgresql"
    if backend not in _SYNC_DRIVERS:
        raise InvalidStoreURLError(
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


#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def _prepare_sqlite_file(url: URL) -> None:
    if not is_memory_sqlite(url) and not str(url.database).startswith("file:"):
        path = Path(str(url.database)).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot create the directory of the session database {path}: {exc}") from exc
        # SQLite takes a non-empty file shorter than its header for an empty database and overwrites it: a
        # mistyped --store must never destroy a user's file.
        try:
            with open(path, "rb") as handle:
                head = handle.read(len(SQLITE_HEADER))
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return  # created by SQLite / refused by it with its own error
        if head and head != SQLITE_HEADER:
            raise StoreUnavailableError(f"{path} is not an SQLite database (it holds other data; not touched)")


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


def _split_libpq_options(options: str) -> list[str]:
    """libpq's ``options`` string: arguments separated by spaces, a backslash escapes the next character."""
    args, current, escaped, started = [], [], False, False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif ch.isspace():
            if started:
                args.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if escaped:
        raise InvalidStoreURLError(f"options {options!r} ends with a lone backslash")
    if started:
        args.append("".join(current))
    return args


def asyncpg_server_settings(options: str) -> dict[str, str]:
    """Translate a libpq ``options`` string (``-c name=value``, ``-cname=value``, ``--name=value``) into
    asyncpg's ``server_settings``: asyncpg has no ``options`` parameter, but sends the same run-time settings
    at connection start-up. Raises :class:`InvalidStoreURLError` (a ``ValueError``) for anything else libpq would pass to the server."""
    settings: dict[str, str] = {}
    args = _split_libpq_options(options)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-c" and i + 1 < len(args):
            pair, i = args[i + 1], i + 2
        elif arg.startswith("-c") and len(arg) > 2:
            pair, i = arg[2:], i + 1
        elif arg.startswith("--") and "=" in arg:
            pair, i = arg[2:], i + 1
        else:
            raise InvalidStoreURLError(
                f"cannot translate {arg!r} in the URL's options={options!r} for asyncpg: only run-time settings "
                "(-c name=value) are supported"
            )
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidStoreURLError(f"cannot translate {pair!r} in the URL's options={options!r}: expected name=value")
        settings[name.replace("-", "_")] = value
    return settings


def _engine_kwargs(url: URL) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        if is_memory_sqlite(url):
            # One connection shared by every caller, or each connection would see its own empty database.
            return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        return {}
    return {"pool_pre_ping": True}


#: PostgreSQL drivers come with the ``postgres`` extra (SQLite's are in the core install).
_PG_DRIVER_MODULES = {"postgresql+psycopg": "psycopg", "postgresql+asyncpg": "asyncpg"}


def _require_driver(url: URL) -> None:
    """A clear :class:`~deltamem_agents.extras.MissingDependencyError` for a PostgreSQL URL without its driver,
    rather than SQLAlchemy's bare ``ModuleNotFoundError`` at the first connection."""
    module = _PG_DRIVER_MODULES.get(url.drivername)
    if module is not None:
        require(module, "postgres", "a PostgreSQL store")


def make_engine(url: str | URL | None, *, busy_timeout_s: float = 30) -> Engine:
    """A sync engine for ``url`` (normalised), with the SQLite hooks installed."""
    from sqlalchemy import create_engine

    normalized = normalize_url(url, async_=False)
    _require_driver(normalized)
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
    _require_driver(normalized)
    if normalized.get_backend_name() == "sqlite":
        _prepare_sqlite_file(normalized)
    kwargs = _engine_kwargs(normalized)
    if normalized.drivername == "postgresql+asyncpg" and "options" in normalized.query:
        # The shared-database recipe (?options=-csearch_path%3D…) is libpq syntax; asyncpg takes server_settings.
        options = normalized.query["options"]
        settings: dict[str, str] = {}
        for value in (options,) if isinstance(options, str) else options:
            settings.update(asyncpg_server_settings(value))
        normalized = normalized.difference_update_query(["options"])
        kwargs["connect_args"] = {"server_settings": settings}
    engine = create_async_engine(normalized, **kwargs)
    if normalized.get_backend_name() == "sqlite":
        _install_sqlite_hooks(engine.sync_engine, busy_timeout_s)
    return engine


# ---------------------------------------------------------------------------------------------- errors
_SQLITE_FULL, _SQLITE_NOTADB, _SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT = 13, 26, 14, 8, 10, 11
#: PostgreSQL SQLSTATEs meaning the server cannot serve us now (connection, start-up, login, resources).
_PG_UNAVAILABLE_CLASSES = ("08", "28", "53", "57")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _sqlite_code(error: BaseException | None) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF  # the primary result code (extended codes keep it in the low byte)
    return None


def translate_error(error: BaseException, where: str, *, connecting: bool = False) -> StoreError | None:
    """The typed store error for a driver / SQLAlchemy error, or None when it is none we know.

    ``where`` names the database (password hidden); ``connecting`` says the error came from opening a
    connection, where any failure means the database is unavailable. Disk full (SQLite ``SQLITE_FULL``,
    PostgreSQL 53100) → :class:`StorageFullError`; a file that is not a database, a path that cannot be opened,
    a refused or dropped connection, a failed login, a server shutting down → :class:`StoreUnavailableError`;
    any other database error → :class:`StoreError` with the driver's message.
    """
    if isinstance(error, StoreError):
        return None
    orig = error.orig if isinstance(error, DBAPIError) else error
    code = _sqlite_code(orig)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    reason = _first_line(orig) if orig is not None else _first_line(error)
    if code == _SQLITE_FULL or sqlstate == "53100" or "database or disk is full" in reason:
        return StorageFullError(f"no space left for a write to the session database {where}: {reason}")
    if code == _SQLITE_NOTADB or "file is not a database" in reason:
        return StoreUnavailableError(f"{where} is not an SQLite database ({reason})")
    if code in (_SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT):
        return StoreUnavailableError(f"cannot use the session database {where}: {reason}")
    if isinstance(sqlstate, str) and (sqlstate.startswith(_PG_UNAVAILABLE_CLASSES) or sqlstate == "3D000"):
        return StoreUnavailableError(f"cannot use the session database {where}: {reason}")
    if isinstance(error, DBAPIError):
        if connecting or error.connection_invalidated:
            return StoreUnavailableError(f"cannot reach the session database {where}: {reason}")
        return StoreError(f"database error on {where}: {reason}")
    if isinstance(error, OSError | sqlite3.Error):
        # asyncpg raises OSError (refused, unknown host, timeout) without SQLAlchemy's wrapper.
        return StoreUnavailableError(f"cannot reach the session database {where}: {reason}")
    return None


@contextlib.contextmanager
def typed_errors(where: str, *, connecting: bool = False) -> Iterator[None]:
    """Re-raise database errors inside the block as typed store errors (see :func:`translate_error`); the
    driver's error stays attached as ``__cause__``. Works around ``await`` too (a plain ``with``)."""
    try:
        yield
    except (DBAPIError, OSError, sqlite3.Error) as exc:
        typed = translate_error(exc, where, connecting=connecting)
        if typed is None:
            raise
        raise typed from exc
