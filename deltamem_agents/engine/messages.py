"""Chat messages: validation, normalisation and digests.

The engine accepts dicts ``{"role", "content"}`` (OpenAI style, optionally ``name``, ``tool_call_id``,
``tool_calls``) or objects with ``role``/``content`` attributes (LangChain messages, with ``type`` in place of
``role``, are understood too). Everything is validated before anything changes.

The **digest** of a message identifies what would be written for it: SHA-256 over a canonical JSON of role,
content and the optional fields. The written record keeps it, so a resent history is matched message by message.

``tool_calls`` are kept in one canonical shape, ``[{"id"?, "type": "function", "function": {"name", "arguments"}}]``
with ``arguments`` an object when it is JSON text of one (OpenAI sends a string, templates want an object, and a
client that re-serialises the arguments with other spacing still sends the same call): the template renders it
as its own, and an assistant reply with calls is recognised when a client resends it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidMessageError

__all__ = ["ROLES", "Message", "normalize_message", "normalize_messages"]

ROLES = ("system", "user", "assistant", "tool")

# LangChain-style ``type`` names → roles.
_TYPE_TO_ROLE = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}
_EXTRA_KEYS = ("name", "tool_call_id", "tool_calls")


@dataclass(frozen=True)
class Message:
    """A validated message. ``extra`` holds the optional fields (``name``, ``tool_call_id``, ``tool_calls``)
    that the chat template may render and that are part of the digest."""

    role: str
    content: str
    extra: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def digest(self) -> str:
        payload = {"role": self.role, "content": self.content, **dict(self.extra)}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_template(self) -> dict[str, Any]:
        """The dict handed to ``tokenizer.apply_chat_template``."""
        return {"role": self.role, "content": self.content, **dict(self.extra)}


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI / LangChain content parts: only text is supported
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidMessageError(f"{where}: content part of type {kind!r} is not supported (text only)")
        return "".join(parts)
    raise InvalidMessageError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _canonical_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """``tool_calls`` in OpenAI's shape, a flat ``{"name", "arguments"}`` or LangChain's ``{"name", "args", "id"}``
    → the canonical shape (see the module docstring)."""
    if not isinstance(calls, list | tuple):
        raise InvalidMessageError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            fn = call
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidMessageError(f"{where}: tool_calls[{i}] must be an object with a function name")
        args = fn.get("arguments", fn.get("args", {}))
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                args = parsed
        entry: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        call_id = call.get("id")
        if call_id not in (None, ""):
            entry["id"] = str(call_id)
        out.append(entry)
    return out


def normalize_message(message: Any, position: int = 0) -> Message:
    """Validate one message (dict or object) and return a :class:`Message`.

    Raises :class:`InvalidMessageError` for an unknown role, non-text content, or empty content in a system,
    user or tool message. An assistant message may be empty (a model can answer with nothing, and frameworks
    resend that answer).
    """
    where = f"message {position}"
    if isinstance(message, Message):
        return message
    if isinstance(message, Mapping):
        role = message.get("role")
        content = message.get("content")
        extra_src: Mapping[str, Any] | None = message
    else:
        role = getattr(message, "role", None)
        if role is None and isinstance(getattr(message, "type", None), str):
            role = _TYPE_TO_ROLE.get(message.type, message.type)
        if role is None or not hasattr(message, "content"):
            raise InvalidMessageError(f"{where}: expected a dict or an object with 'role' and 'content'")
        content = message.content
        extra_src = None
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidMessageError(f"{where}: invalid role {role!r}; use one of {', '.join(ROLES)}")
    text = _content_text(content, where)
    extra: list[tuple[str, Any]] = []
    if extra_src is not None:
        for key in _EXTRA_KEYS:
            value = extra_src.get(key)
            if value not in (None, "", []):
                if key == "tool_calls":
                    value = _canonical_tool_calls(value, where)
                extra.append((key, value))
    if role != "assistant" and not text.strip():
        raise InvalidMessageError(f"{where}: empty {role} message")
    if role == "assistant" and not text and not any(k == "tool_calls" for k, _ in extra):
        text = ""  # an empty answer is a valid assistant message
    return Message(role=role, content=text, extra=tuple(extra))


def normalize_messages(messages: Iterable[Any] | Any) -> list[Message]:
    """Validate a list of messages (a single dict/object/string is accepted as a one-message list; a bare
    string is a user message)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    elif isinstance(messages, Mapping) or isinstance(messages, Message) or hasattr(messages, "content"):
        messages = [messages]
    try:
        items = list(messages)
    except TypeError as exc:
        raise InvalidMessageError(f"messages must be a list of messages, got {type(messages).__name__}") from exc
    return [normalize_message(m, i) for i, m in enumerate(items)]
