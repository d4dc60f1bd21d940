"""deltamem-agents: δ-mem (a fixed-size associative memory for frozen LLMs) as a memory backend for agents.

The public names below are imported lazily, so ``import deltamem_agents.store`` (which stores bytes and never
needs torch) does not pay for importing torch and transformers. Every error the package raises on purpose
derives from :class:`DeltaMemError` (``deltamem_agents.errors``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DeltaMemConfig": ".adapter",
    "DeltaMemModel": ".adapter",
    "DeltaMemState": ".adapter",
    "attach": ".adapter",
    "import_official_adapter": ".adapter",
    "load_adapter": ".adapter",
    "save_adapter": ".adapter",
    "MemoryEngine": ".engine",
    "DeltaMemError": ".errors",
}

__all__ = [
    "DeltaMemConfig",
    "DeltaMemError",
    "DeltaMemModel",
    "DeltaMemState",
    "MemoryEngine",
    "__version__",
    "attach",
    "import_official_adapter",
    "load_adapter",
    "save_adapter",
]

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import (
        DeltaMemConfig,
        DeltaMemModel,
        DeltaMemState,
        attach,
        import_official_adapter,
        load_adapter,
        save_adapter,
    )
    from .engine import MemoryEngine
    from .errors import DeltaMemError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltamem_agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
