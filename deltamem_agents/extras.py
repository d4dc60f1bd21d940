"""Optional dependencies: what each extra brings, and one clear error when a feature needs one that is missing.

The core install runs the engine on SQLite. The rest is opt-in: ``deltamem-agents[postgres]`` (PostgreSQL
stores: psycopg, asyncpg), ``[eval]`` (BM25 RAG baseline and report plots: bm25s, matplotlib), ``[train]``
(training curves: matplotlib), ``[server]`` (``deltamem serve``), ``[cuda]`` (Triton kernels). A feature imports
its dependency through :func:`require`, so a missing one is a :class:`MissingDependencyError` naming the extra to
install rather than a bare ``ModuleNotFoundError`` from deep inside. No heavy imports here.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .errors import DeltaMemError

__all__ = ["EXTRAS", "MissingDependencyError", "pyplot", "require"]

#: extra → the modules it provides (import names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "postgres": ("psycopg", "asyncpg"),
    "eval": ("bm25s", "matplotlib"),
    "train": ("matplotlib",),
    "server": ("fastapi", "uvicorn", "pydantic_settings", "prometheus_client"),
    "cuda": ("triton",),
}


class MissingDependencyError(DeltaMemError, ImportError):
    """A feature needs a package that is not installed; the message names the extra that brings it."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package {module!r}, which is not installed: "
            f"pip install 'deltamem-agents[{extra}]'",
            name=module,
        )
        self.extra = extra


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (an import name such as ``"psycopg"``), or raise :class:`MissingDependencyError`.

    Args:
        module: what to import.
        extra: the extra that installs it (a key of :data:`EXTRAS`).
        purpose: what needs it, for the message (``"a PostgreSQL store"``).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # A missing package, not a broken one: an ImportError raised *inside* an installed package propagates.
        missing = getattr(error, "name", None)
        if missing is not None and missing != module and not module.startswith(f"{missing}."):
            raise
        raise MissingDependencyError(module, extra, purpose) from error


def pyplot(extra: str, purpose: str) -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (plots are written to files, never shown)."""
    matplotlib = require("matplotlib", extra, purpose)
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
