"""Text → JSON / tool calls, for structured output by prompting and for templates that render tools."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from langchain_core.exceptions import OutputParserException

__all__ = ["extract_json", "parse_tool_calls", "template_supports_tools"]

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def extract_json(text: str) -> Any:
    """The first JSON object (or array) in ``text``: a fenced block first, else the first ``{``/``[`` that
    starts a valid JSON value. Raises :class:`OutputParserException` when there is none."""
    decoder = json.JSONDecoder()
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        for i, ch in enumerate(candidate):
            if ch in "{[":
                try:
                    value, _ = decoder.raw_decode(candidate[i:])
                except json.JSONDecodeError:
                    continue
                return value
    raise OutputParserException(f"no JSON object found in the model's output: {text[:200]!r}", llm_output=text)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a reply into text and tool calls written as ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
    (the Hermes / Qwen convention that tool-aware chat templates ask for).

    Returns ``(content, tool_calls, invalid_tool_calls)`` in LangChain's dict shapes.
    """
    calls: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    for match in _TOOL_CALL.finditer(text):
        raw = match.group(1).strip()
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        try:
            payload = json.loads(raw)
            name = payload["name"]
            args = payload.get("arguments", payload.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError("name must be a string and arguments an object")
        except (ValueError, KeyError, TypeError) as exc:
            invalid.append({"type": "invalid_tool_call", "name": None, "args": raw, "id": call_id,
                            "error": f"unparsable tool call: {exc}"})
            continue
        calls.append({"type": "tool_call", "name": name, "args": args, "id": call_id})
    content = _TOOL_CALL.sub("", text).strip() if (calls or invalid) else text
    return content, calls, invalid


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list (a Jinja template that reads ``tools``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: {"default": ..., "tool_use": ...}
        return "tool_use" in template or any("tools" in str(t) for t in template.values())
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None
