"""The store contract: what the engine may ask of a session store, sync and async alike.

The store keeps bytes, dtypes and shapes; it never imports torch or model code (the engine turns a
:class:`~deltamem_agents.adapter.DeltaMemState` into :class:`TensorBlob` rows and back).

Model of a session
------------------
A session is identified by ``(namespace, session_id)``. It advances in **turns**: turn 0 is the fresh session
(zero state, nothing written, empty window); every :meth:`SessionStore.commit` appends turn ``t + 1`` holding

* the full memory state after that turn (a list of :class:`TensorBlob`; an empty list means the zero state),
* the :class:`WrittenMessage` records of the messages written *in that turn* (the record of everything written
  so far is the concatenation over turns ``1..t+1``; records are indexed by their position in the history),
* the recent window's messages after that turn (:class:`WindowMessage`, the text the prompt keeps).

Every turn is a snapshot: :meth:`SessionStore.load` with ``turn=k`` gives the state, written records and window
as they were after turn ``k``; :meth:`SessionStore.rollback` drops every turn after ``k``. A state is kilobytes,
so keeping all turns is cheap; ``max_snapshots`` in the store's options may prune old turns (never the latest).

Concurrency
-----------
Every mutation bumps ``version``. :meth:`SessionStore.commit` (and the other mutations that take
``expected_version``) succeed only if the stored version still equals ``expected_version``, checked and
bumped in the same transaction (``UPDATE … WHERE version = :expected``): a write that raced another raises
:class:`ConcurrentUpdateError` and changes nothing. The caller reloads and retries, or refuses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

DEFAULT_NAMESPACE = "default"

#: Allowed session ids and namespaces: 1–128 characters, starting with a letter or digit, then letters, digits
#: and ``. _ : @ -``. No slashes, spaces or control characters (ids end up in file names and URLs).
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")

#: Dtypes a state tensor may have (names as in torch / numpy).
ALLOWED_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")


# ---------------------------------------------------------------------------------------------------- errors
class StoreError(Exception):
    """Base class of every error the store raises."""


class InvalidIdentifierError(StoreError, ValueError):
    """A session id or namespace that does not match :data:`IDENTIFIER_PATTERN`."""


class SessionNotFoundError(StoreError, KeyError):
    """No session with that id in that namespace (or no such turn)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "session not found"


class SessionExistsError(StoreError):
    """Creating (or forking / importing into) a session id that is already taken."""


class ConcurrentUpdateError(StoreError):
    """The session changed since it was read (``expected_version`` is stale): nothing was written."""


class CorruptStateError(StoreError):
    """A stored or offered state blob is unreadable: checksum mismatch, size not matching dtype × shape,
    unknown dtype, or malformed metadata."""


# ---------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class TensorBlob:
    """One state tensor as raw little-endian bytes (C order).

    ``checksum`` is the hex SHA-256 of ``data``; the store computes it on write when it is empty and verifies it
    on every read (raising :class:`CorruptStateError` on mismatch).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    checksum: str = ""


@dataclass(frozen=True)
class WrittenMessage:
    """The record that history message ``index`` was written into the state.

    ``digest`` is the hex SHA-256 the engine computes over the message (role, content and anything else that
    changes what is written); ``tokens`` the number of tokens written for it.
    """

    index: int
    role: str
    digest: str
    tokens: int


@dataclass(frozen=True)
class WindowMessage:
    """A message kept as text in the recent window (``index``: its position in the history)."""

    index: int
    role: str
    content: str
    tokens: int


@dataclass(frozen=True)
class SessionInfo:
    """A session's header row."""

    session_id: str
    namespace: str
    model_fingerprint: str
    adapter_fingerprint: str
    version: int
    turn: int  # latest turn (0 = fresh)
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionData:
    """A session as of one turn: header, state tensors, the full written record up to that turn, the window."""

    info: SessionInfo
    turn: int
    state: list[TensorBlob]
    written: list[WrittenMessage]
    window: list[WindowMessage]


@dataclass(frozen=True)
class TurnInfo:
    """One snapshot: ``written_count`` messages written in all up to and including this turn."""

    turn: int
    created_at: datetime
    written_count: int
    state_bytes: int


@dataclass(frozen=True)
class SessionStats:
    info: SessionInfo
    turns: int  # snapshots kept
    written_messages: int
    written_tokens: int
    window_messages: int
    state_bytes: int  # latest state
    stored_bytes: int  # all snapshots' state bytes


def validate_identifier(value: str, what: str = "session id") -> str:
    """Return ``value`` if it is an allowed session id / namespace, else raise :class:`InvalidIdentifierError`."""
    # fullmatch, not match: ``$`` alone would accept a trailing newline ("abc\n").
    if not isinstance(value, str) or not IDENTIFIER_PATTERN.fullmatch(value):
        raise InvalidIdentifierError(
            f"invalid {what} {value!r}: use 1-128 characters, starting with a letter or digit, then letters, "
            "digits or . _ : @ -"
        )
    return value


# ---------------------------------------------------------------------------------------------------- contract
@runtime_checkable
class SessionStore(Protocol):
    """Synchronous session store. :class:`AsyncSessionStore` has the same methods as coroutines."""

    def create(
        self,
        session_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        model_fingerprint: str,
        adapter_fingerprint: str,
        metadata: dict[str, Any] | None = None,
    ) -> SessionInfo:
        """Create turn 0 (zero state). Raises :class:`SessionExistsError`."""
        ...

    def get(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionInfo:
        """Header only. Raises :class:`SessionNotFoundError`."""
        ...

    def exists(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> bool: ...

    def load(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int | None = None) -> SessionData:
        """State, written record and window as of ``turn`` (default: latest). Checksums verified."""
        ...

    def commit(
        self,
        session_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        expected_version: int,
        state: Sequence[TensorBlob],
        written: Sequence[WrittenMessage],
        window: Sequence[WindowMessage],
        base_turn: int | None = None,
    ) -> SessionInfo:
        """Append a turn atomically (state, newly written records, window) and bump the version.

        ``base_turn`` (default: the latest) is the turn this one follows: passing an earlier turn first drops
        every later turn in the same transaction (the engine's replay after a diverging history).
        Raises :class:`ConcurrentUpdateError` when the version moved, :class:`CorruptStateError` for a blob whose
        size does not match dtype × shape or whose dtype is not allowed.
        """
        ...

    def rollback(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int, expected_version: int | None = None
    ) -> SessionInfo:
        """Drop every turn after ``turn``. Raises :class:`SessionNotFoundError` for a turn not kept."""
        ...

    def reset(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, expected_version: int | None = None
    ) -> SessionInfo:
        """Back to a fresh turn 0: every state, snapshot, record and window message goes; header stays."""
        ...

    def fork(
        self,
        source_id: str,
        new_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        new_namespace: str | None = None,
        turn: int | None = None,
    ) -> SessionInfo:
        """Copy a session (all turns up to ``turn``, default latest) to a new id. The source is untouched."""
        ...

    def delete(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Remove the session and everything it owns. Raises :class:`SessionNotFoundError`."""
        ...

    def list_sessions(
        self, *, namespace: str | None = DEFAULT_NAMESPACE, limit: int = 100, offset: int = 0
    ) -> list[SessionInfo]:
        """Sessions ordered by ``updated_at`` descending; ``namespace=None`` lists all namespaces."""
        ...

    def list_turns(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> list[TurnInfo]: ...

    def stats(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionStats: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncSessionStore(Protocol):
    """Asynchronous session store: the methods of :class:`SessionStore` as coroutines, same semantics."""

    async def create(
        self,
        session_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        model_fingerprint: str,
        adapter_fingerprint: str,
        metadata: dict[str, Any] | None = None,
    ) -> SessionInfo: ...

    async def get(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionInfo: ...

    async def exists(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> bool: ...

    async def load(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int | None = None
    ) -> SessionData: ...

    async def commit(
        self,
        session_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        expected_version: int,
        state: Sequence[TensorBlob],
        written: Sequence[WrittenMessage],
        window: Sequence[WindowMessage],
        base_turn: int | None = None,
    ) -> SessionInfo: ...

    async def rollback(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int, expected_version: int | None = None
    ) -> SessionInfo: ...

    async def reset(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, expected_version: int | None = None
    ) -> SessionInfo: ...

    async def fork(
        self,
        source_id: str,
        new_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        new_namespace: str | None = None,
        turn: int | None = None,
    ) -> SessionInfo: ...

    async def delete(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> None: ...

    async def list_sessions(
        self, *, namespace: str | None = DEFAULT_NAMESPACE, limit: int = 100, offset: int = 0
    ) -> list[SessionInfo]: ...

    async def list_turns(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> list[TurnInfo]: ...

    async def stats(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionStats: ...

    async def close(self) -> None: ...
