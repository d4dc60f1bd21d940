"""Framework messages → the engine's message dicts: the rules both integrations share.

Each framework has its own message classes; its adapter turns a message into ``(role, parts, extras)`` and
these helpers apply the common rules: role aliases, text-only content (an assistant message's non-text blocks —
tool calls, reasoning — are left out of the text, since tool calls travel as ``tool_calls``), and the OpenAI
shape of tool calls. The engine validates the result (unknown roles, empty content) with
:class:`~deltamem_agents.engine.InvalidMessageError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..engine.errors import InvalidMessageError

__all__ = ["ROLE_ALIASES", "engine_message", "engine_role", "openai_tool_call", "text_from_parts"]

ROLE_ALIASES: Mapping[str, str] = {
    "human": "user", "ai": "assistant", "developer": "system", "model": "assistant", "chatbot": "assistant",
    "function": "tool",
}  # fmt: skip
"""Framework role names → the engine's roles (``system``, ``user``, ``assistant``, ``tool``)."""


def engine_role(role: str) -> str:
    """The engine's name for ``role`` (an alias mapped, anything else unchanged: the engine checks it)."""
    return ROLE_ALIASES.get(role, role)


def text_from_parts(parts: Iterable[tuple[str, str | None]], *, role: str, owner: str) -> str:
    """Join a message's content parts, given as ``(kind, text)`` with ``text=None`` for a non-text part.

    Raises:
        InvalidMessageError: a non-text part (image, audio, file…) in a message that is not the assistant's.
    """
    texts: list[str] = []
    for kind, text in parts:
        if text is not None:
            texts.append(text)
        elif role != "assistant":
            raise InvalidMessageError(f"{owner} accepts text only; got a content block of type {kind!r} in a "
                                      f"{role} message")
    return "".join(texts)


def openai_tool_call(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    """A tool call in the OpenAI shape the engine (and chat templates) take; ``arguments`` as given."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def engine_message(role: str, content: str, *, name: str | None = None, tool_calls: list[Any] | None = None,
                   tool_call_id: str | None = None) -> dict[str, Any]:
    """The engine's message dict; optional fields only when set (they are part of the message's digest)."""
    out: dict[str, Any] = {"role": engine_role(role), "content": content}
    if name:
        out["name"] = name
    if tool_calls:
        out["tool_calls"] = list(tool_calls)
    if tool_call_id:
        out["tool_call_id"] = tool_call_id
    return out
