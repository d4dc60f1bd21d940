"""Task data shared by training and evaluation: synthetic dialogues, bAbI 1–3, BANKING77.

``load_task(name, path=None, split=..., limit=..., seed=...)`` returns a list of
:class:`~deltamem_agents.training.examples.MemoryExample`; examples that share one written context carry the same
``meta["group"]`` and are adjacent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..examples import MemoryExample
from .babi import load_babi
from .banking77 import load_banking77
from .synthetic import (
    MAX_LEVEL,
    SLOT_NAMES,
    curriculum_level,
    sample_value,
    synthetic_dialogues,
    synthetic_group,
    value_split,
)

#: Environment variable naming the folder with the development benchmarks (see ``../shared/benchmarks``).
BENCHMARKS_ENV = "DELTAMEM_BENCHMARKS_DIR"


def _need_path(name: str, path: str | Path | None) -> Path:
    if path is None:
        env = os.environ.get(BENCHMARKS_ENV)
        if not env:
            raise ValueError(f"task {name!r} reads files: pass path=... (--data) or set {BENCHMARKS_ENV}")
        path = env
    return Path(path)


def _synthetic(path, split, limit, seed, **kw) -> list[MemoryExample]:
    split = {"test": "heldout", "all": "train"}.get(split, split)
    q = kw.pop("questions_per_context", 4)
    level = kw.pop("level", MAX_LEVEL)
    if kw:
        raise TypeError(f"unexpected options for synthetic: {sorted(kw)}")
    limit = 200 if limit is None else limit
    out: list[MemoryExample] = []
    i = 0
    while len(out) < limit:
        lvl = i % (MAX_LEVEL + 1) if level is None else level
        out.extend(synthetic_group(i, split=split, seed=seed, level=lvl, questions_per_context=q))
        i += 1
    return out[:limit]


def _babi(task: int) -> Callable[..., list[MemoryExample]]:
    def load(path, split, limit, seed, **kw):
        return load_babi(_need_path(f"babi{task}", path), task, split=split, limit=limit, seed=seed, **kw)

    return load


def _banking(path, split, limit, seed, **kw):
    return load_banking77(_need_path("banking77", path), split=split, limit=limit, seed=seed, **kw)


TASKS: dict[str, Callable[..., list[MemoryExample]]] = {
    "synthetic": _synthetic,
    "babi1": _babi(1),
    "babi2": _babi(2),
    "babi3": _babi(3),
    "banking77": _banking,
}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def load_task(
    name: str, path: str | Path | None = None, *, split: str = "test", limit: int | None = None, seed: int = 0,
    **options: Any,
) -> list[MemoryExample]:
    """Load a task's examples.

    Args:
        name: one of :func:`list_tasks` (``synthetic``, ``babi1``, ``babi2``, ``babi3``, ``banking77``).
        path: the data file, its folder, or the benchmarks root (``$DELTAMEM_BENCHMARKS_DIR`` when omitted);
            unused by ``synthetic``.
        split: ``"train"`` or ``"test"`` (synthetic: ``"test"`` means ``"heldout"``, values never used in
            training); ``"all"`` for the file tasks.
        limit: at most this many examples (synthetic default 200, banking77 default 100, bAbI: all).
        seed: makes choices and sampling deterministic.
        options: task-specific (synthetic: ``level``, ``questions_per_context``; banking77: ``num_classes``,
            ``shots``, ``queries_per_episode``, ``per_message``; bAbI: ``max_choices``).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {list_tasks()}")
    return TASKS[name](path, split, limit, seed, **options)


__all__ = [
    "BENCHMARKS_ENV",
    "MAX_LEVEL",
    "SLOT_NAMES",
    "TASKS",
    "curriculum_level",
    "list_tasks",
    "load_babi",
    "load_banking77",
    "load_task",
    "sample_value",
    "synthetic_dialogues",
    "synthetic_group",
    "value_split",
]
