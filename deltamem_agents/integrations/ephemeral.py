"""Throwaway sessions that touch no database: the one mechanism shared by the server and the integrations.

A call that names no session (a stateless chat-model call, an OpenAI request without a session id) runs in a
throwaway session on the engine's **twin**: a second :class:`~deltamem_agents.MemoryEngine` on the same model
object (so it shares the weights and the model's forward lock: no second load, calls still take turns), with the
same mode and generation defaults, but a private in-memory store and no KV cache. The session is deleted when
the call ends; nothing of it ever reaches the real store, its database or its cache directory.

Each engine has at most one twin, built on first use (cheap: no weights are loaded) and kept as long as the
engine lives.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import Any

__all__ = ["EPHEMERAL_PREFIX", "close_ephemeral_engine", "ephemeral_engine", "make_ephemeral_engine",
           "new_ephemeral_id"]

EPHEMERAL_PREFIX = "tmp-"
"""Prefix of throwaway session ids (never shown to a caller: their metadata says ``session_id=None``)."""

_TWINS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def new_ephemeral_id() -> str:
    """A fresh throwaway session id (unique: a UUID4)."""
    return EPHEMERAL_PREFIX + uuid.uuid4().hex


def make_ephemeral_engine(engine: Any) -> Any:
    """A new :class:`~deltamem_agents.MemoryEngine` on ``engine``'s model with the same generation and mode
    options, an in-memory store and no KV cache (a throwaway session has no next turn to reuse it).

    Raises:
        TypeError: ``engine`` is not a ``MemoryEngine`` (a twin needs its model object).
    """
    from ..engine import MemoryEngine
    from ..store.memory import InMemorySessionStore

    if not isinstance(engine, MemoryEngine):
        raise TypeError(f"a throwaway twin needs a MemoryEngine, got {type(engine).__name__}")
    online = getattr(engine, "_modes", {}).get("online")
    return MemoryEngine(
        (engine.model, engine.tokenizer), store=InMemorySessionStore(), mode=engine.default_mode,
        window_tokens=engine.window_tokens, kv_tokens=engine.kv_tokens,
        kv_retain=float(getattr(online, "retain", 0.5)), kv_cache_bytes=0, kv_cache_dir=None,
        max_message_tokens=engine.max_message_tokens, max_new_tokens=engine.max_new_tokens,
        sampling=engine.sampling, namespace=engine.namespace, history=engine.history,
        on_divergence=engine.on_divergence, max_messages_per_call=engine.max_messages_per_call,
        max_retries=engine.max_retries,
    )  # fmt: skip


def ephemeral_engine(engine: Any) -> Any:
    """The twin of ``engine`` for throwaway sessions, built on first use and shared afterwards (thread-safe)."""
    with _LOCK:
        twin = _TWINS.get(engine)
        if twin is None:
            twin = make_ephemeral_engine(engine)
            _TWINS[engine] = twin
        return twin


def close_ephemeral_engine(engine: Any) -> None:
    """Forget ``engine``'s twin, if it has one, and close it (its in-memory sessions are dropped)."""
    with _LOCK:
        twin = _TWINS.pop(engine, None)
    if twin is not None:
        twin.close()


def _set_twin(engine: Any, twin: Any) -> None:
    """Give a stand-in engine (a test double, which has no model object) a stand-in twin."""
    with _LOCK:
        _TWINS[engine] = twin
