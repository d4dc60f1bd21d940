"""deltamem-agents: δ-mem (a fixed-size associative memory for frozen LLMs) as a memory backend for agents."""

from .adapter import (
    DeltaMemConfig,
    DeltaMemModel,
    DeltaMemState,
    attach,
    import_official_adapter,
    load_adapter,
    save_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "DeltaMemConfig",
    "DeltaMemModel",
    "DeltaMemState",
    "__version__",
    "attach",
    "import_official_adapter",
    "load_adapter",
    "save_adapter",
]
