"""Response ids: the table ``deltamem_responses`` that maps a ``resp_…`` id to the session turn it produced.

``previous_response_id`` must find its session in any worker and after a restart, so the map lives in the
session store's database, beside the sessions (the same approach as :mod:`.keys`: a table of the server's own,
created when missing, on the store's SQLAlchemy engine; a store without a database gets an in-memory one).
A row holds the response's JSON body too, so ``GET /v1/responses/{id}`` returns exactly what was answered.
Every lookup is by ``(namespace, id)``: another tenant's id reads as unknown.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    select,
    text,
)
from sqlalchemy.engine import Connection

from ..store.connect import make_engine
from ..store.ops import run_in_transaction

__all__ = ["ResponseRecord", "ResponseStore", "response_store"]

T = TypeVar("T")
#: pg_advisory_xact_lock key of the table creation (distinct from the keys table's and the store's).
_PG_CREATE_LOCK = 0x646D72657370  # "dmresp"

_metadata = MetaData()
responses_table = Table(
    "deltamem_responses",
    _metadata,
    Column("id", String(64), primary_key=True),
    Column("namespace", String(128), nullable=False),
    Column("session_id", String(128), nullable=False),
    Column("turn", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("body_json", Text, nullable=False),
    Index("ix_deltamem_responses_session", "namespace", "session_id"),
)


@dataclass(frozen=True)
class ResponseRecord:
    """One stored response: where it left its session, and its body."""

    id: str
    namespace: str
    session_id: str
    turn: int
    body: dict[str, Any]


class ResponseStore:
    """The response-id map on ``engine`` (shared, never disposed here) or, for ``None``, in memory (owned)."""

    def __init__(self, engine: Engine | None = None) -> None:
        self._owns = engine is None
        self._engine = engine if engine is not None else make_engine("sqlite://")
        self._run(True, self._create_table)

    def close(self) -> None:
        if self._owns:
            self._engine.dispose()

    def _run(self, write: bool, fn: Callable[..., T], *args: Any) -> T:
        with self._engine.connect() as conn:
            return run_in_transaction(conn, write, fn, *args)

    @staticmethod
    def _create_table(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":  # two processes creating it at once would collide
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CREATE_LOCK})
        _metadata.create_all(conn, checkfirst=True)

    def put(self, namespace: str, session_id: str, turn: int, body: dict[str, Any]) -> None:
        """Record response ``body["id"]`` (a new id: ids are random)."""
        row = {"id": body["id"], "namespace": namespace, "session_id": session_id, "turn": turn,
               "created_at": datetime.now(UTC), "body_json": json.dumps(body, ensure_ascii=False)}
        self._run(True, lambda conn: conn.execute(responses_table.insert().values(**row)))

    def get(self, namespace: str, response_id: str) -> ResponseRecord | None:
        t = responses_table

        def query(conn: Connection) -> Any:
            return conn.execute(select(t).where(t.c.id == response_id, t.c.namespace == namespace)).first()

        row = self._run(False, query)
        if row is None:
            return None
        return ResponseRecord(row.id, row.namespace, row.session_id, row.turn, json.loads(row.body_json))

    def delete(self, namespace: str, response_id: str) -> bool:
        """Forget one response; ``False`` when there was none."""
        t = responses_table
        result = self._run(True, lambda conn: conn.execute(
            delete(t).where(t.c.id == response_id, t.c.namespace == namespace)))
        return bool(result.rowcount)

    def delete_session(self, namespace: str, session_id: str) -> None:
        """Forget every response of a deleted session (they could only ever be 404s at the session)."""
        t = responses_table
        self._run(True, lambda conn: conn.execute(
            delete(t).where(t.c.namespace == namespace, t.c.session_id == session_id)))


_LOCK = threading.Lock()


def response_store(app_state: Any, store: Any) -> ResponseStore:
    """The app's :class:`ResponseStore`, opened on first use and kept on ``app.state`` (the app's lifespan is
    not ours to extend; a shared database engine needs no closing, an in-memory one goes with the app)."""
    existing = getattr(app_state, "deltamem_responses", None)
    if existing is not None:
        return existing
    with _LOCK:
        existing = getattr(app_state, "deltamem_responses", None)
        if existing is None:
            sql_engine = getattr(store, "engine", None)
            existing = ResponseStore(sql_engine if isinstance(sql_engine, Engine) else None)
            app_state.deltamem_responses = existing
        return existing
