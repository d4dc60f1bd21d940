"""The one example type shared by training data, task loaders and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MemoryExample"]


@dataclass
class MemoryExample:
    """A conversation whose history holds the evidence, then a question about it.

    Attributes:
        id: stable id (task name + index or source id).
        task: task name (``synthetic``, ``babi1``, ``banking77``, ``locomo``, ``conversation``, ...).
        history: earlier messages, ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``.
        question: the final user message.
        answers: accepted answers (the first is canonical; used for the training target).
        choices: optional multiple-choice options (scored by likelihood when given).
        evidence: indices into ``history`` of the messages that hold the evidence (may be empty if unknown).
        meta: anything else (category, slot, whether the value was seen in training, ...).
    """

    id: str
    task: str
    history: list[dict[str, str]]
    question: str
    answers: list[str]
    choices: list[str] | None = None
    evidence: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.answers:
            raise ValueError(f"example {self.id}: at least one accepted answer is required")
        for i, m in enumerate(self.history):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"example {self.id}: history[{i}] must be {{role, content}}, got {m!r}")
        if any(not (0 <= e < len(self.history)) for e in self.evidence):
            raise ValueError(f"example {self.id}: evidence index out of range")
        if self.choices is not None and len(self.choices) < 2:
            raise ValueError(f"example {self.id}: choices needs at least two options")

    @property
    def answer(self) -> str:
        return self.answers[0]
