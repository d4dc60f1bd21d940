"""Typed errors of the session store. Every store call raises one of these, never a raw driver error, for the
failures it knows: bad input, unknown or existing sessions, stale versions, damaged rows, an unreachable or
foreign database, a full disk."""

from __future__ import annotations

from ..errors import DeltaMemError

__all__ = [
    "ConcurrentUpdateError",
    "CorruptSessionError",
    "CorruptStateError",
    "InvalidIdentifierError",
    "InvalidStoreURLError",
    "SchemaVersionError",
    "SessionExistsError",
    "SessionNotFoundError",
    "StorageFullError",
    "StoreError",
    "StoreUnavailableError",
]


class StoreError(DeltaMemError):
    """Base class of every error the store raises."""


class InvalidIdentifierError(StoreError, ValueError):
    """A session id or namespace that does not match :data:`~deltamem_agents.store.base.IDENTIFIER_PATTERN`."""


class InvalidStoreURLError(StoreError, ValueError):
    """A store URL that cannot be used: not a URL, a database other than SQLite or PostgreSQL, or ``options``
    that cannot be passed on."""


class SessionNotFoundError(StoreError, KeyError):
    """No session with that id in that namespace (or no such turn)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "session not found"


class SessionExistsError(StoreError):
    """Creating (or forking / importing into) a session id that is already taken."""


class ConcurrentUpdateError(StoreError):
    """The session changed since it was read (``expected_version`` is stale): nothing was written."""


class CorruptStateError(StoreError):
    """A state blob or record that cannot be accepted: offered for writing with a size not matching dtype × shape,
    an unknown dtype, a bad checksum, malformed records or text a database cannot hold — or found so on read
    (then the subclass :class:`CorruptSessionError`)."""


class CorruptSessionError(CorruptStateError):
    """Stored rows of a session failed verification on read: altered bytes, dtype, shape, records, window or
    header, a lost row, or a turn that could not be verified when the database was upgraded.

    Nothing is returned and nothing may be committed on top. ``namespace``, ``session_id`` and ``turn`` say
    where (``turn`` is None for the session's header), the message says what failed.
    """

    def __init__(self, message: str, *, namespace: str | None = None, session_id: str | None = None,
                 turn: int | None = None) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.session_id = session_id
        self.turn = turn


class SchemaVersionError(StoreError):
    """The database's schema is not the one this version of deltamem expects (too old with
    ``auto_migrate=False``, or newer than any migration this package ships)."""


class StoreUnavailableError(StoreError):
    """The database cannot be used: the server does not answer, refused the login, the connection dropped, or
    the SQLite path is not a database (or cannot be opened). The message names the database (password hidden)."""


class StorageFullError(StoreUnavailableError):
    """The database has no room left for a write (disk or quota full). The write was rolled back whole; reads
    keep working."""
