"""Evaluation tasks: how examples are loaded and how their answers are scored.

``conversation`` (generic JSONL) and ``locomo`` are loaded here; ``synthetic``, ``babi1``–``babi3`` and
``banking77`` come from :mod:`deltamem_agents.training.data` (``load_task``), the same loaders training uses,
so evaluation and training never disagree about a format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...training.examples import MemoryExample
from .conversation import ConversationFormatError, load_conversation_jsonl
from .locomo import load_locomo

__all__ = [
    "TASK_NAMES",
    "ConversationFormatError",
    "EvalTask",
    "load_conversation_jsonl",
    "load_eval_task",
    "load_locomo",
]

TASK_NAMES = ("conversation", "synthetic", "babi", "babi1", "babi2", "babi3", "banking77", "locomo")

DEFAULT_SYSTEM = "You are a helpful assistant with a good memory. Answer the last question briefly."


@dataclass
class EvalTask:
    """Examples plus how to score them.

    Attributes:
        name: task name as given on the command line (``babi2``, ``locomo``, ...).
        examples: the examples, questions sharing a history next to each other.
        metric: how a generated answer is scored: ``"match"`` (exact or whole-word contains after
            normalisation), ``"label"`` (first integer equals the label) or ``"locomo"`` (official token F1
            rules). Examples with ``choices`` are always scored by choice likelihood instead.
        score_kind: ``"accuracy"`` (0/1 scores, Wilson interval) or ``"f1"`` (bootstrap interval).
        system_prompt: the system message of every prompt unless an example sets ``meta["system"]``.
    """

    name: str
    examples: list[MemoryExample]
    metric: str = "match"
    score_kind: str = "accuracy"
    system_prompt: str = DEFAULT_SYSTEM


def _training_loader():
    try:
        from ...training.data import load_task
    except ImportError as exc:  # the training data package is optional at evaluation time
        raise RuntimeError(
            "this task's loader lives in deltamem_agents.training.data, which is not available in this "
            f"installation ({exc})"
        ) from exc
    return load_task


def load_eval_task(
    name: str,
    path: str | Path | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    subtask: int | None = None,
) -> EvalTask:
    """Load task ``name`` (one of :data:`TASK_NAMES`) from ``path``.

    ``babi`` needs ``subtask`` (1–3); ``babi1``–``babi3`` name it directly. ``split`` is passed to the training
    loaders (``synthetic`` evaluates its held-out split by default); ``limit`` caps the number of questions.
    """
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    if name == "babi":
        if subtask not in (1, 2, 3):
            raise ValueError("task 'babi' needs --subtask 1, 2 or 3 (or use babi1, babi2, babi3)")
        name = f"babi{subtask}"
    if name == "conversation":
        if path is None:
            raise ValueError("task 'conversation' needs --data PATH (a JSONL file)")
        return EvalTask(name, load_conversation_jsonl(path, limit=limit))
    if name == "locomo":
        if path is None:
            raise ValueError("task 'locomo' needs --data PATH (locomo10.json or a subset of it)")
        system = "You answer questions about a long conversation."
        return EvalTask(name, load_locomo(path, limit=limit, seed=seed), "locomo", "f1", system)
    load_task = _training_loader()
    kwargs = {"path": path, "limit": limit, "seed": seed}
    if split is not None:
        kwargs["split"] = split
    elif name == "synthetic":
        kwargs["split"] = "heldout"
    examples = list(load_task(name, **kwargs))
    metric = "label" if name == "banking77" else "match"
    return EvalTask(name, _grouped(examples), metric)


def _grouped(examples: list[MemoryExample]) -> list[MemoryExample]:
    """Stable reorder that puts questions sharing a history next to each other (their prefix is cached)."""
    first: dict[int, int] = {}
    keyed = []
    for i, ex in enumerate(examples):
        key = hash(tuple((m["role"], m["content"]) for m in ex.history))
        keyed.append((first.setdefault(key, i), i, ex))
    return [ex for _, _, ex in sorted(keyed, key=lambda t: (t[0], t[1]))]
