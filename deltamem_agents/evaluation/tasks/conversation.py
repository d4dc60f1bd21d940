"""The generic ``conversation`` task: one JSON object per line.

Each line::

    {"id": "optional-id",
     "history": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...],
     "question": "...",
     "answer": "..." | ["accepted", "answers"],
     "choices": ["optional", "multiple-choice", "options"],
     "evidence": [0, 3],
     "system": "optional system prompt",
     "meta": {"anything": "else"}}

Roles are ``system``, ``user`` or ``assistant``. With ``choices`` the example is scored by the likelihood of
each option and at least one accepted answer must be among them; otherwise by exact / contains match of a
greedy answer. ``evidence`` lists 0-based indices into ``history`` of the messages that hold the answer.
Blank lines are skipped. Every problem is reported as ``path:line: what is wrong``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import DeltaMemError
from ...training.examples import MemoryExample
from ..metrics import normalize_text

__all__ = ["ConversationFormatError", "load_conversation_jsonl", "parse_conversation_record"]

_KNOWN_KEYS = {"id", "history", "question", "answer", "answers", "choices", "evidence", "system", "meta"}
_ROLES = ("system", "user", "assistant")


class ConversationFormatError(DeltaMemError, ValueError):
    """A line of a conversation JSONL file is malformed (the message names the file and line)."""


def _strings(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [str(value)]
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{what}' must be a string or a non-empty list of strings")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"'{what}'[{i}] must be a non-empty string, got {v!r}")
        out.append(v)
    return out


def parse_conversation_record(record: Any, default_id: str) -> MemoryExample:
    """Validate one decoded JSON record and build its :class:`MemoryExample` (raises ``ValueError``)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(_KNOWN_KEYS)}")
    for key in ("history", "question"):
        if key not in record:
            raise ValueError(f"missing required field '{key}'")
    if "answer" not in record and "answers" not in record:
        raise ValueError("missing required field 'answer'")
    history = record["history"]
    if not isinstance(history, list):
        raise ValueError("'history' must be a list of {role, content} objects")
    messages = []
    for i, m in enumerate(history):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"history[{i}] must be an object with exactly 'role' and 'content', got {m!r}")
        if m["role"] not in _ROLES:
            raise ValueError(f"history[{i}].role must be one of {_ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"history[{i}].content must be a string")
        messages.append({"role": m["role"], "content": m["content"]})
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    answers = _strings(record.get("answer", record.get("answers")), "answer")
    choices = None
    if record.get("choices") is not None:
        choices = _strings(record["choices"], "choices")
        if len(choices) < 2:
            raise ValueError("'choices' needs at least two options")
        norm = {normalize_text(c) for c in choices}
        if not any(normalize_text(a) in norm for a in answers):
            raise ValueError(f"no accepted answer {answers!r} is among the choices {choices!r}")
    evidence = record.get("evidence") or []
    if not isinstance(evidence, list) or any(isinstance(e, bool) or not isinstance(e, int) for e in evidence):
        raise ValueError("'evidence' must be a list of integer history indices")
    bad = [e for e in evidence if not 0 <= e < len(messages)]
    if bad:
        raise ValueError(f"evidence indices {bad} out of range for a history of {len(messages)} messages")
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    meta = dict(meta)
    if record.get("system") is not None:
        if not isinstance(record["system"], str):
            raise ValueError("'system' must be a string")
        meta["system"] = record["system"]
    ex_id = record.get("id", default_id)
    if not isinstance(ex_id, str | int) or isinstance(ex_id, bool):
        raise ValueError("'id' must be a string")
    return MemoryExample(
        id=str(ex_id), task="conversation", history=messages, question=question, answers=answers,
        choices=choices, evidence=sorted(set(evidence)), meta=meta,
    )  # fmt: skip


def load_conversation_jsonl(path: str | Path, limit: int | None = None) -> list[MemoryExample]:
    """Read and validate a conversation JSONL file (see the module docstring for the format).

    Raises :class:`ConversationFormatError` naming the file and line of the first problem, or when the file
    holds no example or repeats an id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    examples: list[MemoryExample] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConversationFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            try:
                example = parse_conversation_record(record, default_id=f"conversation-{lineno}")
            except ValueError as exc:
                raise ConversationFormatError(f"{path}:{lineno}: {exc}") from None
            if example.id in seen:
                raise ConversationFormatError(
                    f"{path}:{lineno}: duplicate id {example.id!r} (first on line {seen[example.id]})"
                )
            seen[example.id] = lineno
            examples.append(example)
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ConversationFormatError(f"{path}: no examples (the file is empty)")
    return examples
