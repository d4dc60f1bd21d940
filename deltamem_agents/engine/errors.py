"""Typed errors of the engine. Every one is raised *before* anything is changed (state, store, model).

All of them derive from :class:`~deltamem_agents.errors.DeltaMemError` (through :class:`EngineError`) and keep
their built-in bases (``ValueError`` for bad input), so ``except DeltaMemError`` and older ``except ValueError``
code both catch them. The store's errors (re-exported here) derive from ``DeltaMemError`` too.
"""

from __future__ import annotations

from ..errors import DeltaMemError
from ..store.base import ConcurrentUpdateError, CorruptStateError, SessionExistsError, SessionNotFoundError

__all__ = [
    "ConcurrentUpdateError",
    "ContextLengthError",
    "CorruptStateError",
    "EngineError",
    "FingerprintMismatchError",
    "HistoryConflictError",
    "InvalidMessageError",
    "InvalidOptionError",
    "InvalidStateError",
    "MessageTooLongError",
    "PortableFormatError",
    "SessionExistsError",
    "SessionNotFoundError",
    "TooManyMessagesError",
]


class EngineError(DeltaMemError):
    """Base class of the errors the engine itself raises (store errors keep their own classes)."""


class InvalidMessageError(EngineError, ValueError):
    """A message the engine refuses: unknown role, empty content, too many tokens, malformed object."""


class MessageTooLongError(InvalidMessageError):
    """A message over the engine's ``max_message_tokens`` (as rendered)."""


class TooManyMessagesError(InvalidMessageError):
    """A call with more messages than the engine's ``max_messages_per_call`` (refused before any work)."""


class ContextLengthError(InvalidMessageError):
    """The messages that must be in the prompt (the current turn) do not fit the model's context window."""


class InvalidOptionError(EngineError, ValueError):
    """An option of a call or of the engine that is refused: a NaN temperature, a seed out of range, a stop that
    is not text, ``max_new_tokens`` beyond the context window, an unknown mode… ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


class FingerprintMismatchError(EngineError):
    """A stored or imported state was written with another base model or adapter than the engine's.

    Loading it would give silently wrong answers, so the engine refuses; use a matching model/adapter, or reset
    the session.
    """


class InvalidStateError(EngineError, ValueError):
    """A state that cannot be used: NaN/Inf values, or a layout (layers, rank, write mode) this model lacks."""


class PortableFormatError(EngineError, ValueError):
    """A file given to ``import_session`` is not a deltamem session export (or a newer format version)."""


class HistoryConflictError(EngineError, ConcurrentUpdateError):
    """The call's history does not follow what the session holds: the session has committed messages that the
    caller's view of the conversation lacks at their position (another writer appended after the caller's last
    view, or the caller edited / cut its history), or the session moved past ``expected_version``.

    Raised before anything is generated or written. Re-sending the same call fails the same way: reload the
    session (or send only the new messages with ``history="append"``, or opt into ``on_divergence="rollback"``
    to replace what the session holds). A :class:`ConcurrentUpdateError` (the session changed from the
    caller's point of view), so existing ``except ConcurrentUpdateError`` code sees it.

    Attributes:
        namespace, session_id: the session.
        version: the session's version when the conflict was found (0: the session does not exist).
        common_prefix: how many of the session's committed messages (from its first) the caller's history
            agrees with.
        missing: how many committed messages the caller's history does not have at their position
            (``committed - common_prefix``).
        expected_version: the version the caller said it last saw (``None`` when not given).
    """

    def __init__(self, message: str, *, namespace: str, session_id: str, version: int, common_prefix: int,
                 missing: int, expected_version: int | None = None) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.session_id = session_id
        self.version = version
        self.common_prefix = common_prefix
        self.missing = missing
        self.expected_version = expected_version
