"""Fixtures of the store tests: every test runs on an SQLite file and on PostgreSQL.

PostgreSQL comes from ``$DELTAMEM_TEST_POSTGRES_URL`` (e.g. ``postgresql://postgres@127.0.0.1:5432/test``).
Without it the PostgreSQL cases are skipped, except under CI (``$CI`` set), where they fail: CI must test both.
Each test works in a namespace of its own, so tests never see each other's sessions on a shared server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from deltamem_agents.store import SQLSessionStore

PG_ENV = "DELTAMEM_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


def postgres_url() -> str:
    url = os.environ.get(PG_ENV, "").strip()
    if not url:
        reason = f"PostgreSQL tests need ${PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run them, so it is a failure there, not a skip")
        pytest.skip(reason)
    return url


def backend_url(backend: str, tmp_path) -> str:
    return str(tmp_path / "sessions.db") if backend == "sqlite" else postgres_url()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def url(backend: str, tmp_path) -> str:
    return backend_url(backend, tmp_path)


@pytest.fixture
def ns() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def purge_namespace(store: SQLSessionStore, namespace: str) -> None:
    """Delete what a test left in its namespace (keeps a shared PostgreSQL database small)."""
    for info in store.list_sessions(namespace=namespace, limit=10_000):
        store.delete(info.session_id, namespace=namespace)


@pytest.fixture
def store(url: str, ns: str) -> Iterator[SQLSessionStore]:
    s = SQLSessionStore(url)
    yield s
    purge_namespace(s, ns)
    s.close()
