"""The core shared by the framework integrations (``langchain-deltamem``, ``llama-index-llms-deltamem``) and the
server, so that each integration is a thin adapter over one implementation:

* :mod:`.registry` — one engine per configuration per process (:func:`get_engine`, :func:`clear_engines`);
* :mod:`.ephemeral` — throwaway sessions on an engine's twin with a private in-memory store (no database);
* :mod:`.target` — :class:`SessionTarget`: which engine and session one call runs in;
* :mod:`.generation` — generation options, with the engine's defaults as the one source of truth;
* :mod:`.metadata` — the served model's name and :func:`result_metadata` (a call's result as a plain dict);
* :mod:`.messages` — role aliases, text-only content, OpenAI-shaped tool calls;
* :mod:`.tools` — whether an engine parses tool calls, and the typed errors of tool calling.

:mod:`.testing` (a stand-in engine and pytest fixtures for the integrations' tests) needs pytest and is not
imported here. User guide: ``docs/integrations/``.
"""

from .ephemeral import (
    EPHEMERAL_PREFIX,
    close_ephemeral_engine,
    ephemeral_engine,
    make_ephemeral_engine,
    new_ephemeral_id,
)
from .generation import GenerationDefaults, generation_options
from .messages import ROLE_ALIASES, engine_message, engine_role, openai_tool_call, text_from_parts
from .metadata import EMBEDDED_MODEL_NAME, result_metadata, served_model_name, usage_metadata
from .registry import EngineKey, clear_engines, engine_key, get_engine, registered_engines
from .target import SessionTarget
from .tools import NoToolCallError, ToolCallingUnsupportedError, check_tool_calling, supports_tool_calls

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "EPHEMERAL_PREFIX",
    "ROLE_ALIASES",
    "EngineKey",
    "GenerationDefaults",
    "NoToolCallError",
    "SessionTarget",
    "ToolCallingUnsupportedError",
    "check_tool_calling",
    "clear_engines",
    "close_ephemeral_engine",
    "engine_key",
    "engine_message",
    "engine_role",
    "ephemeral_engine",
    "generation_options",
    "get_engine",
    "make_ephemeral_engine",
    "new_ephemeral_id",
    "openai_tool_call",
    "registered_engines",
    "result_metadata",
    "served_model_name",
    "supports_tool_calls",
    "text_from_parts",
    "usage_metadata",
]
