"""The run-time engine: sessions whose memory is a δ-mem state (see ``docs/engine.md``).

>>> engine = MemoryEngine()                          # embedded model, shipped adapter, SQLite store
>>> engine.chat("alice", [{"role": "user", "content": "My name is Alice."}]).text

The public names are imported lazily (on first access), so importing a submodule that needs no model —
``deltamem_agents.engine.cli_commands`` behind ``deltamem sessions list``, or ``.errors`` — does not pay for
importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the submodule defining it
_EXPORTS = {
    "DEFAULT_SAMPLING": ".engine",
    "MODES": ".engine",
    "PROTOCOLS": ".engine",
    "MemoryEngine": ".engine",
    "KVCacheStats": ".kv_pool",
    "ConcurrentUpdateError": ".errors",
    "ContextLengthError": ".errors",
    "CorruptStateError": ".errors",
    "EngineError": ".errors",
    "FingerprintMismatchError": ".errors",
    "HistoryConflictError": ".errors",
    "InvalidMessageError": ".errors",
    "InvalidOptionError": ".errors",
    "InvalidStateError": ".errors",
    "MessageTooLongError": ".errors",
    "PortableFormatError": ".errors",
    "SessionExistsError": ".errors",
    "SessionNotFoundError": ".errors",
    "TooManyMessagesError": ".errors",
    "Message": ".messages",
    "normalize_messages": ".messages",
    "ChatChunk": ".results",
    "ChatResult": ".results",
    "Usage": ".results",
    "WriteResult": ".results",
    "SamplingParams": ".sampling",
}

__all__ = [
    "DEFAULT_SAMPLING",
    "MODES",
    "PROTOCOLS",
    "ChatChunk",
    "ChatResult",
    "ConcurrentUpdateError",
    "ContextLengthError",
    "CorruptStateError",
    "EngineError",
    "FingerprintMismatchError",
    "HistoryConflictError",
    "InvalidMessageError",
    "InvalidOptionError",
    "InvalidStateError",
    "KVCacheStats",
    "MemoryEngine",
    "Message",
    "MessageTooLongError",
    "PortableFormatError",
    "SamplingParams",
    "SessionExistsError",
    "SessionNotFoundError",
    "TooManyMessagesError",
    "Usage",
    "WriteResult",
    "normalize_messages",
]

if TYPE_CHECKING:  # pragma: no cover
    from .engine import DEFAULT_SAMPLING, MODES, PROTOCOLS, MemoryEngine
    from .errors import (
        ConcurrentUpdateError,
        ContextLengthError,
        CorruptStateError,
        EngineError,
        FingerprintMismatchError,
        HistoryConflictError,
        InvalidMessageError,
        InvalidOptionError,
        InvalidStateError,
        MessageTooLongError,
        PortableFormatError,
        SessionExistsError,
        SessionNotFoundError,
        TooManyMessagesError,
    )
    from .kv_pool import KVCacheStats
    from .messages import Message, normalize_messages
    from .results import ChatChunk, ChatResult, Usage, WriteResult
    from .sampling import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
