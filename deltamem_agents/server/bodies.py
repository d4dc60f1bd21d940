"""OpenAI response bodies built from the engine's results: chat completions, text completions, their stream
chunks, and usage (with ``prompt_tokens_details.cached_tokens``, the prompt tokens the KV cache saved).

Each completion also carries a ``deltamem`` object (the session, its version and turn after the call, how
the KV cache was obtained); OpenAI clients keep unknown fields, so it is readable but never in the way.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CallIds",
    "chat_chunk",
    "chat_completion_body",
    "chat_message",
    "completion_body",
    "completion_chunk",
    "deltamem_extension",
    "tool_call_deltas",
    "usage_body",
]


@dataclass(frozen=True)
class CallIds:
    """What every body and chunk of one call repeats: its id, creation time and model."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    @classmethod
    def new(cls, prefix: str, model: str, adapter_fingerprint: str) -> CallIds:
        return cls(f"{prefix}-{secrets.token_hex(12)}", int(time.time()), model, "dm-" + adapter_fingerprint[:12])


def usage_body(usage: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def deltamem_extension(result: Any, session_id: str | None, version: int | None) -> dict[str, Any]:
    """``session_id``/``version`` are ``None`` for a throwaway session (it no longer exists)."""
    return {
        "session_id": session_id, "session_version": version,
        "turn": result.turn if session_id is not None else None,
        "kv_cache": result.kv_cache, "replayed": result.replayed,
        "written_tokens": result.usage.written_tokens, "mode": result.mode,
    }  # fmt: skip


def chat_message(result: Any) -> dict[str, Any]:
    """The assistant message of a chat completion: with tool calls, ``content`` is the text outside them
    (``None`` when there is none) and ``tool_calls`` lists them; otherwise the reply's text."""
    if not result.tool_calls:
        return {"role": "assistant", "content": result.text, "refusal": None}
    return {"role": "assistant", "content": result.content, "refusal": None,
            "tool_calls": [call.to_openai() for call in result.tool_calls]}


def tool_call_deltas(index: int, call: Any) -> list[dict[str, Any]]:
    """A call as stream deltas (OpenAI's shape): its id, type and name with empty arguments, then the arguments."""
    return [
        {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
        {"index": index, "function": {"arguments": call.arguments}},
    ]


def chat_completion_body(ids: CallIds, result: Any, extension: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
        "system_fingerprint": ids.system_fingerprint,
        "choices": [{
            "index": 0, "message": chat_message(result), "logprobs": None, "finish_reason": result.finish_reason,
        }],
        "usage": usage_body(result.usage),
        "deltamem": extension,
    }  # fmt: skip


def chat_chunk(ids: CallIds, delta: dict[str, Any] | None, finish_reason: str | None = None, *,
               include_usage: bool, usage: Any = None, extension: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``. ``delta=None`` is the usage chunk (``choices: []``). With
    ``include_usage`` every other chunk says ``"usage": null``, as OpenAI's do."""
    body: dict[str, Any] = {
        "id": ids.id, "object": "chat.completion.chunk", "created": ids.created, "model": ids.model,
        "system_fingerprint": ids.system_fingerprint,
        "choices": [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
    }  # fmt: skip
    if include_usage:
        body["usage"] = usage_body(usage) if usage is not None else None
    if extension is not None:
        body["deltamem"] = extension
    return body


def completion_body(ids: CallIds, text: str, result: Any, extension: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
        "system_fingerprint": ids.system_fingerprint,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage_body(result.usage),
        "deltamem": extension,
    }  # fmt: skip


def completion_chunk(ids: CallIds, text: str | None, finish_reason: str | None = None, *, include_usage: bool,
                     usage: Any = None, extension: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed ``text_completion``; ``text=None`` is the usage chunk (``choices: []``)."""
    body: dict[str, Any] = {
        "id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
        "system_fingerprint": ids.system_fingerprint,
        "choices": [] if text is None else [
            {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        ],
    }  # fmt: skip
    if include_usage:
        body["usage"] = usage_body(usage) if usage is not None else None
    if extension is not None:
        body["deltamem"] = extension
    return body
