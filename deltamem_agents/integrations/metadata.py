"""What a framework reports about a call: the served model's name and a call's result as a plain dict.

:func:`result_metadata` is the one mapping from a :class:`~deltamem_agents.engine.ChatResult` to the metadata
every integration puts into its responses (LangChain ``response_metadata``, LlamaIndex ``raw``), so the
packages cannot drift apart.
"""

from __future__ import annotations

import os
from typing import Any

from ..models import EMBEDDED_MODEL, display_name

__all__ = ["EMBEDDED_MODEL_NAME", "result_metadata", "served_model_name", "usage_metadata"]

EMBEDDED_MODEL_NAME: str = EMBEDDED_MODEL.name
"""The name reported when no model is named: the embedded model's (``MemoryEngine(None).model_name``)."""


def served_model_name(model: str | os.PathLike[str] | None = None, engine: Any = None) -> str:
    """The model's name as the engine reports it (``MemoryEngine.model_name``, never a path), without loading
    anything: the engine's own name when there is one, else the name it will have — the embedded model's for
    ``None``, a directory's or GGUF file's base name, a hub id as given."""
    if engine is not None and getattr(engine, "model_name", None):
        return str(engine.model_name)
    return display_name(None if model is None else os.fspath(model), None)


def usage_metadata(usage: Any) -> dict[str, int]:
    """A :class:`~deltamem_agents.engine.Usage` as a dict: ``prompt_tokens``, ``completion_tokens``,
    ``total_tokens``, ``cached_tokens`` (prompt tokens reused from the session's KV cache), ``written_tokens``
    (written into the state by this call), ``full_context_tokens`` (what a full-context prompt would need)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "written_tokens": usage.written_tokens,
        "full_context_tokens": usage.full_context_tokens,
    }


def result_metadata(result: Any, *, model_name: str, ephemeral: bool = False,
                    version: int | None = None) -> dict[str, Any]:
    """The metadata of one call, a plain JSON-able dict.

    Keys: ``model_name``, ``finish_reason``, ``session_id``, ``namespace``, ``version`` (the session's version
    after the call), ``turn``, ``replayed``, ``rolled_back_to``, ``mode``, ``kv_cache`` (online mode: ``hot``,
    ``disk``, ``rebuilt``, ``slid``, ``new``; else ``None``), ``written_messages`` and ``usage``
    (:func:`usage_metadata`). A throwaway session (``ephemeral``) reports ``session_id``, ``version`` and
    ``turn`` as ``None``: it no longer exists.
    """
    return {
        "model_name": model_name,
        "finish_reason": result.finish_reason,
        "session_id": None if ephemeral else result.session_id,
        "namespace": result.namespace,
        "version": None if ephemeral else version,
        "turn": None if ephemeral else result.turn,
        "replayed": result.replayed,
        "rolled_back_to": result.rolled_back_to,
        "mode": result.mode,
        "kv_cache": result.kv_cache,
        "written_messages": result.written_messages,
        "usage": usage_metadata(result.usage),
    }
