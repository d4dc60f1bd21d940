"""Fixtures of the framework integrations: one engine on the embedded model per test module.

The engine writes to a temporary SQLite store (never the user's cache) and uses a fresh, deterministically
initialised adapter (``adapter="none"``), so results do not depend on which trained adapter is installed.
"""

from __future__ import annotations

import inspect

import pytest


@pytest.fixture(scope="module")
def deltamem_engine(embedded, tmp_path_factory):
    """A MemoryEngine on the shared embedded model, with a temporary SQLite store.

    Module-scoped because the adapter is attached to the session-wide embedded model: it is detached when the
    module ends, so test packages that run later see the plain model (attaching again is cheap; the model
    weights are loaded once per session)."""
    from deltamem_agents import MemoryEngine

    path = tmp_path_factory.mktemp("integrations-store") / "sessions.db"
    engine = MemoryEngine(embedded, adapter="none", store=f"sqlite:///{path}", window_tokens=256)
    yield engine
    engine.close()
    engine.model.detach_adapter()  # the session-scoped embedded model is shared with other test packages


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Run the coroutine tests of this directory (ours and the inherited standard-suite ones) with
    pytest-asyncio: the root configuration uses its strict mode, where a coroutine test needs the mark."""
    if inspect.iscoroutinefunction(obj) and name.startswith("test") and not any(
        m.name == "asyncio" for m in getattr(obj, "pytestmark", [])
    ):
        pytest.mark.asyncio(obj)
    return None
