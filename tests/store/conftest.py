"""Fixtures of the store tests: every test runs on an SQLite file and on PostgreSQL.

PostgreSQL comes from ``$DELTAMEM_TEST_POSTGRES_URL``; without it, from a server that answers on the default
``postgresql://postgres@127.0.0.1:5432/test`` (probed once, with a short timeout), so the README's plain
``python -m pytest -q`` tests both backends on a machine with a local server. With neither, the PostgreSQL
cases are skipped, except under CI (``$CI`` set), where they fail: CI must test both.
Each test works in a namespace of its own, so tests never see each other's sessions on a shared server.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator

import pytest

from deltamem_agents.store import SQLSessionStore

PG_ENV = "DELTAMEM_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@functools.cache
def _local_server_answers() -> bool:
    """Whether the default local PostgreSQL accepts a connection (one probe per test run)."""
    import psycopg

    try:
        psycopg.connect(DEFAULT_PG_URL, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


def postgres_url() -> str:
    url = os.environ.get(PG_ENV, "").strip()
    if url:
        return url
    if _local_server_answers():
        return DEFAULT_PG_URL
    reason = f"PostgreSQL tests need a server at {DEFAULT_PG_URL} or ${PG_ENV}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run them, so it is a failure there, not a skip")
    pytest.skip(reason)


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
