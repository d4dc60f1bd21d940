"""A process-wide registry of :class:`~deltamem_agents.MemoryEngine` objects, shared by every framework object.

Loading a model is the expensive part of an engine (seconds, and its weights in memory), so every framework
object of a process — a LangChain ``ChatDeltaMem``, a LlamaIndex ``DeltaMemLLM`` — that names the same
``(model, adapter, store, window_tokens, other engine options)`` uses one engine, created on first use.

Thread-safe: two threads asking for the same configuration get the same engine, built once (a per-key lock, so
building one engine does not hold up asking for another). Engines are closed by :func:`clear_engines` or, at the
latest, when the interpreter exits (their stores closed, KV caches saved where a ``kv_cache_dir`` was given).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from .ephemeral import close_ephemeral_engine

__all__ = ["EngineKey", "clear_engines", "engine_key", "get_engine", "registered_engines"]

logger = logging.getLogger(__name__)

EngineKey = tuple[Any, ...]
"""``(model, adapter, store, window_tokens, ((option, value), …))``; a store object is keyed by identity."""

_ENGINES: dict[EngineKey, Any] = {}
_BUILDING: dict[EngineKey, threading.Lock] = {}  # one lock per key: a model loads once, others are not held up
_LOCK = threading.Lock()


def _norm(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def engine_key(
    model: str | os.PathLike[str] | None = None,
    adapter: str | os.PathLike[str] | None = None,
    store: Any = None,
    window_tokens: int = 1024,
    **options: Any,
) -> EngineKey:
    """The registry key of an engine configuration.

    ``options`` are further :class:`~deltamem_agents.MemoryEngine` keyword arguments (``mode``, ``kv_cache_dir``,
    ``device``…); their values must be hashable (paths are compared as strings). A store given as an object is
    keyed by identity (the registry keeps it alive, so the identity is not reused).

    Raises:
        TypeError: an option value that cannot be a key (a list, a dict).
    """
    store_key = _norm(store) if store is None or isinstance(store, str | os.PathLike) else ("object", id(store))
    extra = []
    for name in sorted(options):
        value = options[name]
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        try:
            hash(value)
        except TypeError as exc:
            raise TypeError(f"engine option {name}={value!r} is not hashable, so it cannot key a shared engine; "
                            "build the MemoryEngine yourself and pass it as engine=") from exc
        extra.append((name, value))
    return (_norm(model), _norm(adapter), store_key, int(window_tokens), tuple(extra))


def get_engine(
    model: str | os.PathLike[str] | None = None,
    *,
    adapter: str | os.PathLike[str] | None = None,
    store: Any = None,
    window_tokens: int = 1024,
    **options: Any,
) -> Any:
    """The shared :class:`~deltamem_agents.MemoryEngine` of this configuration, created on first use.

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct, or a local path / hub id / GGUF file.
        adapter: ``None`` (the shipped adapter when it fits), a directory, or ``"none"`` (fresh, untrained).
        store: ``None`` (SQLite in the user's cache), a database URL, or a store object.
        window_tokens: tokens of recent history kept as text in windowed mode.
        options: further ``MemoryEngine`` keyword arguments (part of the key).

    A configuration whose engine fails to build (a missing model, a bad URL) raises the engine's error and
    registers nothing: the next call tries again.
    """
    key = engine_key(model, adapter, store, window_tokens, **options)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is not None:
            return engine
        building = _BUILDING.setdefault(key, threading.Lock())
    with building:
        with _LOCK:  # another thread may have built it while this one waited
            engine = _ENGINES.get(key)
        if engine is not None:
            return engine
        from ..engine import MemoryEngine

        engine = MemoryEngine(_norm(model), adapter=_norm(adapter), store=store, window_tokens=window_tokens,
                              **options)
        with _LOCK:
            _ENGINES[key] = engine
        return engine


def registered_engines() -> list[Any]:
    """The engines the registry holds now."""
    with _LOCK:
        return list(_ENGINES.values())


def clear_engines(*, close: bool = True) -> None:
    """Forget every shared engine; unless ``close=False``, close them and their throwaway twins (stores, KV
    cache files). An engine that fails to close is logged and the others are still closed."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
        _BUILDING.clear()
    if not close:
        return
    for engine in engines:
        close_ephemeral_engine(engine)
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - one engine's failure must not leave the others open
            logger.warning("closing a shared engine failed", exc_info=True)


atexit.register(clear_engines)
