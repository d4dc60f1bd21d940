"""A process-wide registry of :class:`~deltamem_agents.MemoryEngine` objects.

Loading a model is the expensive part of an engine (seconds, and its weights in memory), so every
:class:`~langchain_deltamem.ChatDeltaMem` that names the same ``(model, adapter, store, window_tokens)`` shares one
engine, created on first use. Pass ``engine=`` to a chat model to use an engine you built yourself instead.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from deltamem_agents import MemoryEngine

__all__ = ["EngineKey", "clear_engines", "engine_key", "get_engine"]

EngineKey = tuple[str | None, str | None, Any, int]

_ENGINES: dict[EngineKey, MemoryEngine] = {}
_LOCK = threading.Lock()


def _norm(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def engine_key(
    model: str | os.PathLike[str] | None = None,
    adapter: str | os.PathLike[str] | None = None,
    store: Any = None,
    window_tokens: int = 1024,
) -> EngineKey:
    """The registry key of an engine configuration (a store object is keyed by identity)."""
    store_key = _norm(store) if store is None or isinstance(store, str | os.PathLike) else ("object", id(store))
    return (_norm(model), _norm(adapter), store_key, int(window_tokens))


def get_engine(
    model: str | os.PathLike[str] | None = None,
    *,
    adapter: str | os.PathLike[str] | None = None,
    store: Any = None,
    window_tokens: int = 1024,
) -> MemoryEngine:
    """Return the shared engine for this configuration, creating it on first use (thread-safe).

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct, or a local path / hub id / GGUF file.
        adapter: ``None`` (the shipped adapter when it fits), a directory, or ``"none"`` (fresh, untrained).
        store: ``None`` (SQLite in the user's cache), a database URL, or a store object.
        window_tokens: tokens of recent history kept as text in windowed mode.
    """
    key = engine_key(model, adapter, store, window_tokens)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = MemoryEngine(
                None if model is None else os.fspath(model),
                adapter=_norm(adapter),
                store=store,
                window_tokens=window_tokens,
            )
            _ENGINES[key] = engine
        return engine


def clear_engines(*, close: bool = True) -> None:
    """Forget every shared engine (closing the stores they opened unless ``close=False``)."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    if close:
        for engine in engines:
            engine.close()
