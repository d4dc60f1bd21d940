"""The process-wide engine registry, shared with every other δ-mem integration in the process.

Loading a model is the expensive part of an engine, so every :class:`~langchain_deltamem.ChatDeltaMem` (and every
LlamaIndex ``DeltaMemLLM``) that names the same ``(model, adapter, store, window_tokens)`` shares one engine,
created on first use and closed by :func:`clear_engines` or at exit. This module re-exports the core's
registry (:mod:`deltamem_agents.integrations.registry`). Pass ``engine=`` to a chat model to use an engine you
built yourself instead.
"""

from __future__ import annotations

from deltamem_agents.integrations.registry import EngineKey, clear_engines, engine_key, get_engine

__all__ = ["EngineKey", "clear_engines", "engine_key", "get_engine"]
