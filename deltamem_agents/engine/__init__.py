"""The run-time engine: sessions whose memory is a δ-mem state (see ``docs/engine.md``).

>>> engine = MemoryEngine()                          # embedded model, shipped adapter, SQLite store
>>> engine.chat("alice", [{"role": "user", "content": "My name is Alice."}]).text
"""

from .engine import MODES, MemoryEngine
from .errors import (
    ConcurrentUpdateError,
    ContextLengthError,
    CorruptStateError,
    EngineError,
    FingerprintMismatchError,
    InvalidMessageError,
    InvalidStateError,
    PortableFormatError,
    SessionExistsError,
    SessionNotFoundError,
)
from .messages import Message, normalize_messages
from .results import ChatChunk, ChatResult, Usage, WriteResult
from .sampling import SamplingParams

__all__ = [
    "MODES",
    "ChatChunk",
    "ChatResult",
    "ConcurrentUpdateError",
    "ContextLengthError",
    "CorruptStateError",
    "EngineError",
    "FingerprintMismatchError",
    "InvalidMessageError",
    "InvalidStateError",
    "MemoryEngine",
    "Message",
    "PortableFormatError",
    "SamplingParams",
    "SessionExistsError",
    "SessionNotFoundError",
    "Usage",
    "WriteResult",
    "normalize_messages",
]
