"""Typed errors of the engine. Every one is raised *before* anything is changed (state, store, model)."""

from __future__ import annotations

from ..store.base import ConcurrentUpdateError, CorruptStateError, SessionExistsError, SessionNotFoundError

__all__ = [
    "ConcurrentUpdateError",
    "ContextLengthError",
    "CorruptStateError",
    "EngineError",
    "FingerprintMismatchError",
    "InvalidMessageError",
    "InvalidStateError",
    "MessageTooLongError",
    "PortableFormatError",
    "SessionExistsError",
    "SessionNotFoundError",
]


class EngineError(Exception):
    """Base class of the errors the engine itself raises (store errors keep their own classes)."""


class InvalidMessageError(EngineError, ValueError):
    """A message the engine refuses: unknown role, empty content, too many tokens, malformed object."""


class MessageTooLongError(InvalidMessageError):
    """A message over the engine's ``max_message_tokens`` (as rendered)."""


class ContextLengthError(InvalidMessageError):
    """The messages that must be in the prompt (the current turn) do not fit the model's context window."""


class FingerprintMismatchError(EngineError):
    """A stored or imported state was written with another base model or adapter than the engine's.

    Loading it would give silently wrong answers, so the engine refuses; use a matching model/adapter, or reset
    the session.
    """


class InvalidStateError(EngineError, ValueError):
    """A state that cannot be used: NaN/Inf values, or a layout (layers, rank, write mode) this model lacks."""


class PortableFormatError(EngineError, ValueError):
    """A file given to ``import_session`` is not a deltamem session export (or a newer format version)."""
