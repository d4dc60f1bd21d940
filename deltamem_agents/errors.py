"""The root of deltamem's errors: every error the package raises on purpose derives from :class:`DeltaMemError`.

Subsystems keep their own typed errors (``deltamem_agents.store.errors``, ``deltamem_agents.engine.errors``) and
their existing built-in bases (``ValueError``, ``KeyError``), so ``except DeltaMemError`` catches any of them
while older ``except ValueError`` code keeps working. This module imports nothing (the store must stay free of
torch).
"""

from __future__ import annotations

__all__ = ["DeltaMemError"]


class DeltaMemError(Exception):
    """Base class of every error deltamem raises on purpose."""
