"""The store contract: what the engine may ask of a session store, sync and async alike.

The store keeps bytes, dtypes and shapes; it never imports torch or model code (the engine turns a
:class:`~deltamem_agents.adapter.DeltaMemState` into :class:`TensorBlob` rows and back).

Model of a session
------------------
A session is identified by ``(namespace, session_id)``. It advances in **turns**: turn 0 is the fresh session
(zero state, nothing written, empty window); every :meth:`SessionStore.commit` appends turn ``t + 1`` holding

* the full memory state after that turn (a list of :class:`TensorBlob`; an empty list means the zero state),
* the :class:`WrittenMessage` records of the messages written *in that turn* (the record of everything written
  so far is the concatenation over turns ``1..t+1``; records are indexed by their position in the history, so
  a turn's records continue the record without gaps: ``n, n+1, …`` after ``n`` records),
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

from .digests import EMPTY_CHAIN, extend_history
from .errors import (
    ConcurrentUpdateError,
    CorruptSessionError,
    CorruptStateError,
    InvalidIdentifierError,
    SessionExistsError,
    SessionNotFoundError,
    StorageFullError,
    StoreError,
    StoreUnavailableError,
)

DEFAULT_NAMESPACE = "default"

#: Allowed session ids and namespaces: 1–128 characters, starting with a letter or digit, then letters, digits
#: and ``. _ : @ -``. No slashes, spaces or control characters (ids end up in file names and URLs).
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")

#: Dtypes a state tensor may have (names as in torch / numpy).
ALLOWED_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_NAMESPACE",
    "IDENTIFIER_PATTERN",
    "AsyncSessionStore",
    "ConcurrentUpdateError",
    "CorruptSessionError",
    "CorruptStateError",
    "InvalidIdentifierError",
    "RecordSummary",
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
    "validate_identifier",
]


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
class RecordSummary:
    """What a turn needs to know about the written record without reading it (see :mod:`.digests`).

    ``count`` records were written in turns ``1..turn`` (indexes ``0..count-1``), ``tokens`` in all;
    ``first_digest`` is record 0's digest (``""`` when empty); ``history_digest`` the chain of all record
    digests in index order (:func:`~deltamem_agents.store.digests.extend_history`), so a caller can check that
    a resent history matches the whole record by hashing its own messages.
    """

    count: int
    tokens: int
    first_digest: str
    history_digest: str

    @classmethod
    def of(cls, records: Sequence[WrittenMessage]) -> RecordSummary:
        """The summary of a full record (indexes ``0..n-1`` in order)."""
        return cls(len(records), sum(r.tokens for r in records), records[0].digest if records else "",
                   extend_history(EMPTY_CHAIN, (r.digest for r in records)))


@dataclass(frozen=True)
class SessionData:
    """A session as of one turn: header, state tensors, the written record, the window.

    ``record`` always summarises the written record up to that turn. ``written`` is the full record only when
    it was asked for (``load(..., full_record=True)``), else ``None``: a turn does not need it, and reading it
    costs time proportional to the session's length. Built by hand with a ``written`` list, ``record`` is
    derived from it.
    """

    info: SessionInfo
    turn: int
    state: list[TensorBlob]
    written: list[WrittenMessage] | None
    window: list[WindowMessage]
    record: RecordSummary = None  # type: ignore[assignment]  # derived in __post_init__ when omitted

    def __post_init__(self) -> None:
        if self.record is None:
            if self.written is None:
                raise ValueError("SessionData needs the written record or its summary")
            object.__setattr__(self, "record", RecordSummary.of(self.written))


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

    def load(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int | None = None,
             full_record: bool = False) -> SessionData:
        """State, window and record summary as of ``turn`` (default: latest); with ``full_record=True`` also
        every written record up to it. Everything returned is verified first (:class:`CorruptSessionError`)."""
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

        ``written`` must continue the record of ``base_turn``: indexes ``n, n+1, …`` when it holds ``n``
        records (:class:`CorruptStateError` otherwise); text must be storable by every backend (no NUL, no lone
        surrogate). The base turn is verified first: nothing is committed on top of a damaged turn
        (:class:`CorruptSessionError`).

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
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int | None = None,
        full_record: bool = False,
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
