"""Training δ-mem adapters: task data, the trainer, recipes and probes.

Quick use::

    from deltamem_agents.training import get_recipe, train
    adapter_dir = train(get_recipe("smollm2-tsw", steps=100), "runs/tsw")

See ``docs/training.md``. Names are imported lazily, so ``from deltamem_agents.training.examples import ...``
(used by evaluation) does not load the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ContextStream": ".trainer",
    "Trainer": ".trainer",
    "build_model": ".trainer",
    "latest_checkpoint": ".trainer",
    "train": ".trainer",
    "TrainConfig": ".config",
    "MemoryExample": ".examples",
    "get_recipe": ".recipes",
    "list_recipes": ".recipes",
    "list_tasks": ".data",
    "load_task": ".data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
