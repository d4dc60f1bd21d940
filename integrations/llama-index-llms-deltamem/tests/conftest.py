"""Fixtures of llama-index-llms-deltamem's tests, from the integration core's test helpers (no dependency on the
deltamem-agents repository's own test suite): ``embedded`` (the embedded model, loaded once per process),
``deltamem_engine`` (an engine on it with a fresh adapter and a temporary SQLite store, one per test module),
and a hook that runs coroutine tests with pytest-asyncio.

Runs from this directory (``python -m pytest``) and from the repository root (listed in its ``testpaths``).
Test module names must stay unique across the repository (the test directories are not packages).
"""

from deltamem_agents.integrations.testing import (  # noqa: F401  (pytest finds fixtures and hooks by name)
    deltamem_engine,
    embedded,
    pytest_pycollect_makeitem,
)
