"""Tool calling in the in-process integrations: whether an engine can offer it, and its typed errors.

The engine does the work (:mod:`deltamem_agents.engine.tool_calls`): ``tools=`` are rendered by the chat
template, the reply is parsed in the template's own call format, and the reply is written as the assistant
message carrying the parsed ``tool_calls`` (ids included), so a framework that resends that message with the tool
results continues the session without a replay. An integration only has to translate its framework's tool and
message types. That needs an engine with a call format (``engine.tool_call_format``): without one the reply would
never be parsed, so tools are refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from ..errors import DeltaMemError

__all__ = ["NoToolCallError", "ToolCallingUnsupportedError", "check_tool_calling", "supports_tool_calls"]


class ToolCallingUnsupportedError(DeltaMemError, NotImplementedError):
    """Tools were offered to a model whose chat template has no tool-call format the engine parses (the embedded
    SmolLM2-135M-Instruct among them). A ``NotImplementedError``, as LangChain's ``bind_tools`` raises for it."""


class NoToolCallError(DeltaMemError, ValueError):
    """A caller asked for the tool calls of a reply that has none (LlamaIndex's ``error_on_no_tool_call``)."""


def supports_tool_calls(engine: Any) -> bool:
    """Whether ``engine`` parses tool calls out of replies (its template has a known call format)."""
    return getattr(engine, "tool_call_format", None) is not None


def check_tool_calling(engine: Any, *, owner: str, model_name: str) -> None:
    """Raise :class:`ToolCallingUnsupportedError` unless ``engine`` parses tool calls."""
    if not supports_tool_calls(engine):
        raise ToolCallingUnsupportedError(
            f"{owner}: {model_name}'s chat template has no tool-call format the engine parses (Hermes/Qwen "
            "<tool_call> JSON, Llama 3.x JSON), so tools cannot be offered to it: the model would be prompted in a "
            "format it was not trained on and its calls would never be parsed. Use a model whose template supports "
            "tools (e.g. Qwen3), or a prompt-based agent (ReAct) instead."
        )
