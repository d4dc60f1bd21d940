"""Versioned schema migrations, shipped with the package as plain SQL.

Files live in ``store/migrations/`` and are named ``NNNN_name.<dialect>.sql`` (dialect ``sqlite`` or
``postgresql``); every version exists for every dialect. The table ``deltamem_schema_version`` records which
versions a database has. :func:`upgrade` applies the missing ones in order, **each in its own transaction
together with its version row** (and the Python step of :mod:`.upgrade_steps` for that version, if any), so a
migration is either fully applied and recorded or not at all, and running :func:`upgrade` again is a no-op.

Several processes may open a store at once, and each upgrades on open: the migration transaction takes the
database's write lock first (``BEGIN IMMEDIATE`` on SQLite, an advisory transaction lock on PostgreSQL) and then
re-reads the applied versions, so exactly one of them applies each migration and the others see it done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from .connect import WRITE_OPTION, make_engine, typed_errors
from .errors import SchemaVersionError, StoreError
from .upgrade_steps import STEPS

__all__ = [
    "VERSION_TABLE",
    "Migration",
    "SchemaVersionError",
    "check_version_on",
    "current_version",
    "current_version_on",
    "latest_version",
    "migrations",
    "upgrade",
    "upgrade_on",
]

VERSION_TABLE = "deltamem_schema_version"
#: Key of the PostgreSQL advisory lock that serialises migrations (any constant unique to deltamem).
_PG_LOCK_KEY = 0x0DE17A3E3
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(sqlite|postgresql)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # "0001_initial"
    sql: dict[str, str]  # dialect -> script

    def statements(self, dialect: str) -> list[str]:
        """The script for ``dialect`` split into statements (``--`` comment lines dropped)."""
        lines = [line for line in self.sql[dialect].splitlines() if not line.lstrip().startswith("--")]
        return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


@cache
def migrations() -> tuple[Migration, ...]:
    """All migrations shipped with the package, oldest first."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for entry in resources.files("deltamem_agents.store").joinpath("migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            version, name, dialect = match.groups()
            found.setdefault((int(version), f"{version}_{name}"), {})[dialect] = entry.read_text("utf-8")
    result = []
    for expected, ((version, name), scripts) in enumerate(sorted(found.items()), start=1):
        if version != expected or set(scripts) != {"sqlite", "postgresql"}:
            raise RuntimeError(f"broken migration set at {name}: versions must be 1..n, each for both dialects")
        result.append(Migration(version, name, scripts))
    return tuple(result)


def latest_version() -> int:
    return len(migrations())


# ---------------------------------------------------------------------------------------------- on a connection
def _dialect(conn: Connection) -> str:
    name = conn.dialect.name
    if name not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database dialect {name!r}")
    return name


def _version_table_exists(conn: Connection) -> bool:
    from sqlalchemy import inspect

    return inspect(conn).has_table(VERSION_TABLE)


def _applied(conn: Connection) -> set[int]:
    rows = conn.execute(text(f"SELECT version FROM {VERSION_TABLE}"))
    return {int(row[0]) for row in rows}


def current_version_on(conn: Connection) -> int:
    """Highest applied migration (0 for an empty database). Runs in its own read transaction."""
    with conn.begin():
        if not _version_table_exists(conn):
            return 0
        applied = _applied(conn)
    return max(applied, default=0)


def upgrade_on(conn: Connection) -> list[str]:
    """Apply every pending migration on ``conn`` (not in a transaction); return the names applied.

    Written against a sync connection so that the async store runs the very same code through ``run_sync``.
    """
    dialect = _dialect(conn)
    known = migrations()
    # Fast path, a plain read: nothing to do in the common case, so no write lock is taken on every open.
    if current_version_on(conn) == len(known):
        return []
    applied_now: list[str] = []
    conn.execution_options(**{WRITE_OPTION: True})
    try:
        for migration in known:
            with conn.begin():
                if dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                conn.exec_driver_sql(
                    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
                    "version INTEGER NOT NULL PRIMARY KEY, name VARCHAR(128) NOT NULL, "
                    "applied_at VARCHAR(40) NOT NULL)"
                )
                applied = _applied(conn)  # re-read under the lock: another process may have done it
                too_new = {v for v in applied if v > len(known)}
                if too_new:
                    raise SchemaVersionError(
                        f"database schema version {max(too_new)} is newer than this deltamem knows "
                        f"({len(known)}): upgrade deltamem-agents"
                    )
                if migration.version in applied:
                    continue
                for statement in migration.statements(dialect):
                    conn.exec_driver_sql(statement)
                step = STEPS.get(migration.version)
                if step is not None:  # e.g. backfilling what the new columns must hold for existing rows
                    step(conn)
                conn.execute(
                    text(f"INSERT INTO {VERSION_TABLE} (version, name, applied_at) VALUES (:v, :n, :t)"),
                    {"v": migration.version, "n": migration.name, "t": datetime.now(UTC).isoformat()},
                )
                applied_now.append(migration.name)
    finally:
        conn.execution_options(**{WRITE_OPTION: False})
    return applied_now


def check_version_on(conn: Connection) -> None:
    """Raise :class:`SchemaVersionError` unless the database has exactly the shipped schema."""
    version = current_version_on(conn)
    if version != latest_version():
        raise SchemaVersionError(
            f"database schema version is {version}, this deltamem needs {latest_version()}: "
            "run `deltamem db upgrade` (or open the store with auto_migrate=True)"
        )


# ---------------------------------------------------------------------------------------------- public helpers
def _with_engine(url_or_engine: str | URL | Engine | None):
    if isinstance(url_or_engine, Engine):
        return url_or_engine, False
    if hasattr(url_or_engine, "sync_engine"):  # an AsyncEngine
        raise TypeError("pass a sync Engine or a URL (async stores migrate on open)")
    return make_engine(url_or_engine), True


def upgrade(url_or_engine: str | URL | Engine | None = None) -> list[str]:
    """Bring the database at ``url_or_engine`` (default: the local SQLite file) to the latest schema.

    Returns the names of the migrations applied (empty when it was already up to date).
    """
    engine, owned = _with_engine(url_or_engine)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with typed_errors(where, connecting=True):
            conn = engine.connect()
        with conn, typed_errors(where):
            return upgrade_on(conn)
    finally:
        if owned:
            engine.dispose()


def current_version(url_or_engine: str | URL | Engine | None = None) -> int:
    """The schema version of the database (0 when it has none yet)."""
    engine, owned = _with_engine(url_or_engine)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with typed_errors(where, connecting=True):
            conn = engine.connect()
        with conn, typed_errors(where):
            return current_version_on(conn)
    finally:
        if owned:
            engine.dispose()
