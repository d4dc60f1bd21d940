"""LlamaIndex integration of δ-mem: :class:`DeltaMemLLM`, an LLM whose conversations are δ-mem sessions.

See ``docs/integrations/llamaindex.md``.
"""

from llama_index.llms.deltamem.base import (
    EMBEDDED_MODEL_NAME,
    DeltaMemLLM,
    NoToolCallError,
    ToolCallingUnsupportedError,
    clear_engines,
    current_session,
    get_engine,
    session_scope,
)

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "DeltaMemLLM",
    "NoToolCallError",
    "ToolCallingUnsupportedError",
    "clear_engines",
    "current_session",
    "get_engine",
    "session_scope",
]
