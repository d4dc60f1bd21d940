"""Session store: sessions, their state snapshots, written records and windows, on SQLite or PostgreSQL.

``open_store()`` gives a sync :class:`SQLSessionStore` on the local SQLite file; pass a ``postgresql://`` URL
for a shared server. The contract (:mod:`.base`) is what the engine relies on; ``docs/store.md`` describes the
schema, the migrations and the concurrency model. Nothing here imports torch.
"""

from __future__ import annotations

from sqlalchemy.engine import URL

from .base import (
    ALLOWED_DTYPES,
    DEFAULT_NAMESPACE,
    IDENTIFIER_PATTERN,
    AsyncSessionStore,
    ConcurrentUpdateError,
    CorruptSessionError,
    CorruptStateError,
    InvalidIdentifierError,
    RecordSummary,
    SessionData,
    SessionExistsError,
    SessionInfo,
    SessionNotFoundError,
    SessionStats,
    SessionStore,
    StorageFullError,
    StoreError,
    StoreUnavailableError,
    TensorBlob,
    TurnInfo,
    WindowMessage,
    WrittenMessage,
    validate_identifier,
)
from .codec import ITEMSIZE, sha256_hex
from .connect import default_sqlite_path, normalize_url
from .errors import InvalidStoreURLError
from .migrate import SchemaVersionError, current_version, latest_version, upgrade
from .sql import AsyncSQLSessionStore, SQLSessionStore, open_async_store, open_store


def upgrade_database(url: str | URL | None = None) -> list[str]:
    """Migrate the database at ``url`` (default: the local SQLite file) to the latest schema.

    Returns the names of the migrations applied, empty when it was up to date. Backs ``deltamem db upgrade``.
    """
    return upgrade(url)


__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_NAMESPACE",
    "IDENTIFIER_PATTERN",
    "ITEMSIZE",
    "AsyncSQLSessionStore",
    "AsyncSessionStore",
    "ConcurrentUpdateError",
    "CorruptSessionError",
    "CorruptStateError",
    "InvalidIdentifierError",
    "InvalidStoreURLError",
    "RecordSummary",
    "SQLSessionStore",
    "SchemaVersionError",
    "SessionData",
    "SessionExistsError",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionStats",
    "SessionStore",
    "StorageFullError",
    "StoreError",
    "StoreUnavailableError",
    "TensorBlob",
    "TurnInfo",
    "WindowMessage",
    "WrittenMessage",
    "current_version",
    "default_sqlite_path",
    "latest_version",
    "normalize_url",
    "open_async_store",
    "open_store",
    "sha256_hex",
    "upgrade",
    "upgrade_database",
    "validate_identifier",
]
