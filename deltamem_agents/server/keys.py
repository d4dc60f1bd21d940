"""API keys: one table of our own, ``deltamem_api_keys``, in the session store's database.

A key is ``dm-`` + 43 URL-safe characters (256 random bits). Only its SHA-256 is stored: a fast hash is enough
for a secret this random (there is nothing to brute-force; slow password hashes exist for low-entropy human
passwords), and it lets a request find its key with one indexed lookup. The secret is shown once, at creation.

The table is created when missing (``CREATE TABLE`` under the database's write lock, so several processes may
open a fresh database at once); the session tables and their migrations are not touched. It is deliberately
not a store migration: it belongs to the server, and a database used only by the library never gets it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection

from ..errors import DeltaMemError
from ..store.base import validate_identifier
from ..store.connect import make_engine
from ..store.ops import run_in_transaction

__all__ = ["API_KEY_PREFIX", "APIKey", "KeyNotFoundError", "KeyStore", "generate_key", "hash_key"]

#: Every key starts with this, so a leaked one is recognisable (secret scanners, logs).
API_KEY_PREFIX = "dm-"
_KEY_BYTES = 32  # 256 bits of entropy
_MAX_NAME = 200
#: pg_advisory_xact_lock key of the table creation (any constant distinct from the store's migration lock).
_PG_CREATE_LOCK = 0x646D6B657973  # "dmkeys"

T = TypeVar("T")

_metadata = MetaData()
api_keys_table = Table(
    "deltamem_api_keys",
    _metadata,
    Column("id", String(32), primary_key=True),
    Column("namespace", String(128), nullable=False),
    Column("name", String(_MAX_NAME), nullable=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Index("ix_deltamem_api_keys_namespace", "namespace"),
)


class KeyNotFoundError(DeltaMemError, LookupError):
    """No API key with that id."""


@dataclass(frozen=True)
class APIKey:
    """A key's row (never its secret)."""

    id: str
    namespace: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "namespace": self.namespace, "name": self.name,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }  # fmt: skip


def generate_key() -> str:
    """A new secret: ``dm-`` + 43 URL-safe characters."""
    return API_KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)


def hash_key(secret: str) -> str:
    """The hex SHA-256 stored for ``secret``."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back naive (they were written as UTC)
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _row(row: object) -> APIKey:
    return APIKey(row.id, row.namespace, row.name, _utc(row.created_at), _utc(row.revoked_at))  # type: ignore[attr-defined]


class KeyStore:
    """API keys on SQLite or PostgreSQL.

    Args:
        url_or_engine: a store URL (as :func:`~deltamem_agents.store.connect.normalize_url` accepts; ``None``:
            the default SQLite file), or the SQLAlchemy engine of an open
            :class:`~deltamem_agents.store.SQLSessionStore` (shared, not disposed by :meth:`close`).
        busy_timeout_s: SQLite: how long a writer waits for the database lock.
    """

    def __init__(self, url_or_engine: str | URL | Engine | None = None, *, busy_timeout_s: float = 30) -> None:
        if isinstance(url_or_engine, Engine):
            self._engine, self._owns = url_or_engine, False
        else:
            self._engine, self._owns = make_engine(url_or_engine, busy_timeout_s=busy_timeout_s), True
        try:
            self._run(True, self._create_table)
        except BaseException:
            self.close()
            raise

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        if self._owns:
            self._engine.dispose()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, write: bool, fn: Callable[..., T], *args: Any) -> T:
        with self._engine.connect() as conn:
            return run_in_transaction(conn, write, fn, *args)

    @staticmethod
    def _create_table(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":  # two processes creating it at once would collide
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CREATE_LOCK})
        _metadata.create_all(conn, checkfirst=True)

    # ------------------------------------------------------------------------------------------ operations
    def create(self, namespace: str, name: str | None = None) -> tuple[APIKey, str]:
        """A new key bound to ``namespace``. Returns its row and the secret (shown once, never stored)."""
        validate_identifier(namespace, "namespace")
        if name is not None and (not isinstance(name, str) or len(name) > _MAX_NAME):
            raise ValueError(f"name must be a string of at most {_MAX_NAME} characters")
        secret = generate_key()
        key = APIKey("key_" + secrets.token_hex(8), namespace, name, datetime.now(UTC), None)

        def insert(conn: Connection) -> None:
            conn.execute(api_keys_table.insert().values(
                id=key.id, namespace=key.namespace, name=key.name, key_hash=hash_key(secret),
                created_at=key.created_at, revoked_at=None,
            ))  # fmt: skip

        self._run(True, insert)
        return key, secret

    def list_keys(self, namespace: str | None = None, *, include_revoked: bool = True) -> list[APIKey]:
        """Keys (oldest first), of one namespace or all."""

        def query(conn: Connection) -> list[APIKey]:
            q = select(api_keys_table).order_by(api_keys_table.c.created_at, api_keys_table.c.id)
            if namespace is not None:
                q = q.where(api_keys_table.c.namespace == namespace)
            if not include_revoked:
                q = q.where(api_keys_table.c.revoked_at.is_(None))
            return [_row(r) for r in conn.execute(q)]

        return self._run(False, query)

    def revoke(self, key_id: str) -> APIKey:
        """Revoke a key (it stays listed, with ``revoked_at``). Raises :class:`KeyNotFoundError`."""

        def do(conn: Connection) -> APIKey:
            row = conn.execute(select(api_keys_table).where(api_keys_table.c.id == key_id)).first()
            if row is None:
                raise KeyNotFoundError(f"no API key with id {key_id!r}")
            if row.revoked_at is None:
                conn.execute(update(api_keys_table).where(api_keys_table.c.id == key_id)
                             .values(revoked_at=datetime.now(UTC)))
                row = conn.execute(select(api_keys_table).where(api_keys_table.c.id == key_id)).first()
            return _row(row)

        return self._run(True, do)

    def lookup(self, secret: str) -> APIKey | None:
        """The active key whose secret this is, else ``None`` (unknown, revoked or malformed alike)."""
        if not isinstance(secret, str) or not secret.startswith(API_KEY_PREFIX) or len(secret) > 200:
            return None
        digest = hash_key(secret)

        def query(conn: Connection) -> object:
            return conn.execute(select(api_keys_table).where(api_keys_table.c.key_hash == digest)).first()

        row = self._run(False, query)
        # The index finds the row by hash; the compare is constant-time anyway, so no code path's timing
        # depends on how much of a presented secret was right.
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            return None
        return _row(row)

    def count(self) -> int:
        """Keys ever created (revoked ones included)."""
        return int(self._run(False, lambda conn: conn.execute(select(func.count()).select_from(api_keys_table))
                             .scalar_one()))
