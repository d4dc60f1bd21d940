"""SQL session stores: :class:`SQLSessionStore` (sync) and :class:`AsyncSQLSessionStore` (asyncio).

Both are thin shells around :mod:`.ops`: each method validates its options, opens a connection and runs one
shared operation in one transaction (the async store through ``run_sync``). See ``docs/store.md`` for the
schema, URLs and concurrency model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from . import ops
from .base import (
    DEFAULT_NAMESPACE,
    SessionData,
    SessionInfo,
    SessionStats,
    TensorBlob,
    TurnInfo,
    WindowMessage,
    WrittenMessage,
)
from .connect import make_async_engine, make_engine, typed_errors
from .migrate import check_version_on, upgrade_on

if TYPE_CHECKING:  # importing sqlalchemy.ext.asyncio needs greenlet; only the async store needs it at run time
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["AsyncSQLSessionStore", "SQLSessionStore", "open_async_store", "open_store"]


def _check_options(max_snapshots: int | None, busy_timeout_s: float) -> None:
    if max_snapshots is not None and (not isinstance(max_snapshots, int) or max_snapshots < 1):
        raise ValueError(f"max_snapshots must be None or an int >= 1, got {max_snapshots!r}")
    if busy_timeout_s < 0:
        raise ValueError("busy_timeout_s must be >= 0")


class SQLSessionStore:
    """A :class:`~deltamem_agents.store.base.SessionStore` on SQLite or PostgreSQL.

    Args:
        url: database URL (see :func:`~deltamem_agents.store.connect.normalize_url`); ``None`` is the SQLite
            file ``cache_dir()/sessions.db``.
        max_snapshots: keep at most this many snapshots per session (oldest pruned first, the latest never);
            ``None`` keeps every turn. Written records are never pruned.
        auto_migrate: bring the schema up to date on open; with ``False``, opening a database whose schema is
            not current raises :class:`~deltamem_agents.store.migrate.SchemaVersionError`.
        busy_timeout_s: SQLite only: how long a writer waits for another writer's lock before failing.

    Safe to share between threads (each call checks a connection out of the pool). Not fork-safe: open the
    store in the process that uses it.
    """

    def __init__(self, url: str | URL | None = None, *, max_snapshots: int | None = None,
                 auto_migrate: bool = True, busy_timeout_s: float = 30) -> None:
        _check_options(max_snapshots, busy_timeout_s)
        self.max_snapshots = max_snapshots
        self._engine = make_engine(url, busy_timeout_s=busy_timeout_s)
        try:
            with typed_errors(self.url, connecting=True):
                conn = self._engine.connect()
            with conn, typed_errors(self.url):
                if auto_migrate:
                    upgrade_on(conn)
                else:
                    check_version_on(conn)
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def engine(self) -> Engine:
        """The underlying SQLAlchemy engine (for inspection and tests; the store owns it)."""
        return self._engine

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _run(self, write: bool, fn: Any, *args: Any) -> Any:
        with typed_errors(self.url, connecting=True):
            conn = self._engine.connect()
        with conn, typed_errors(self.url):
            return ops.run_in_transaction(conn, write, fn, *args)

    # ------------------------------------------------------------------------------------------ the contract
    def create(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, model_fingerprint: str,
               adapter_fingerprint: str, metadata: dict[str, Any] | None = None) -> SessionInfo:
        return self._run(True, ops.create, session_id, namespace, model_fingerprint, adapter_fingerprint,
                         metadata)

    def get(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionInfo:
        return self._run(False, ops.get, session_id, namespace)

    def exists(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        return self._run(False, ops.exists, session_id, namespace)

    def load(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int | None = None,
             full_record: bool = False) -> SessionData:
        return self._run(False, ops.load, session_id, namespace, turn, full_record)

    def commit(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, expected_version: int,
               state: Sequence[TensorBlob], written: Sequence[WrittenMessage], window: Sequence[WindowMessage],
               base_turn: int | None = None) -> SessionInfo:
        return self._run(True, ops.commit, session_id, namespace, expected_version, state, written, window,
                         base_turn, self.max_snapshots)

    def rollback(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int,
                 expected_version: int | None = None) -> SessionInfo:
        return self._run(True, ops.rollback, session_id, namespace, turn, expected_version)

    def reset(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE,
              expected_version: int | None = None) -> SessionInfo:
        return self._run(True, ops.reset, session_id, namespace, expected_version)

    def fork(self, source_id: str, new_id: str, *, namespace: str = DEFAULT_NAMESPACE,
             new_namespace: str | None = None, turn: int | None = None) -> SessionInfo:
        return self._run(True, ops.fork, source_id, new_id, namespace, new_namespace, turn)

    def delete(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._run(True, ops.delete_session, session_id, namespace)

    def list_sessions(self, *, namespace: str | None = DEFAULT_NAMESPACE, limit: int = 100,
                      offset: int = 0) -> list[SessionInfo]:
        return self._run(False, ops.list_sessions, namespace, limit, offset)

    def list_turns(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> list[TurnInfo]:
        return self._run(False, ops.list_turns, session_id, namespace)

    def stats(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionStats:
        return self._run(False, ops.stats, session_id, namespace)

    def close(self) -> None:
        """Close every pooled connection. The store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> SQLSessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSQLSessionStore:
    """The asyncio twin of :class:`SQLSessionStore` (``aiosqlite`` / ``asyncpg``): same methods, as coroutines.

    Construct it, then ``await store.open()`` (or use ``async with AsyncSQLSessionStore(url) as store``, or
    :func:`open_async_store`): opening migrates the schema, which needs the event loop. Methods called before
    :meth:`open` open the store first.
    """

    def __init__(self, url: str | URL | None = None, *, max_snapshots: int | None = None,
                 auto_migrate: bool = True, busy_timeout_s: float = 30) -> None:
        _check_options(max_snapshots, busy_timeout_s)
        self.max_snapshots = max_snapshots
        self._auto_migrate = auto_migrate
        self._engine = make_async_engine(url, busy_timeout_s=busy_timeout_s)
        self._opened = False

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    async def open(self) -> AsyncSQLSessionStore:
        """Migrate (or check) the schema. Idempotent."""
        if not self._opened:
            with typed_errors(self.url, connecting=True):
                conn = await self._engine.connect().start()
            try:
                with typed_errors(self.url):
                    await conn.run_sync(upgrade_on if self._auto_migrate else check_version_on)
            finally:
                await conn.close()
            self._opened = True
        return self

    async def _run(self, write: bool, fn: Any, *args: Any) -> Any:
        if not self._opened:
            await self.open()
        with typed_errors(self.url, connecting=True):
            conn = await self._engine.connect().start()
        try:
            with typed_errors(self.url):
                return await conn.run_sync(ops.run_in_transaction, write, fn, *args)
        finally:
            await conn.close()

    # ------------------------------------------------------------------------------------------ the contract
    async def create(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, model_fingerprint: str,
                     adapter_fingerprint: str, metadata: dict[str, Any] | None = None) -> SessionInfo:
        return await self._run(True, ops.create, session_id, namespace, model_fingerprint, adapter_fingerprint,
                               metadata)

    async def get(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionInfo:
        return await self._run(False, ops.get, session_id, namespace)

    async def exists(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        return await self._run(False, ops.exists, session_id, namespace)

    async def load(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE,
                   turn: int | None = None, full_record: bool = False) -> SessionData:
        return await self._run(False, ops.load, session_id, namespace, turn, full_record)

    async def commit(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, expected_version: int,
                     state: Sequence[TensorBlob], written: Sequence[WrittenMessage],
                     window: Sequence[WindowMessage], base_turn: int | None = None) -> SessionInfo:
        return await self._run(True, ops.commit, session_id, namespace, expected_version, state, written, window,
                               base_turn, self.max_snapshots)

    async def rollback(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int,
                       expected_version: int | None = None) -> SessionInfo:
        return await self._run(True, ops.rollback, session_id, namespace, turn, expected_version)

    async def reset(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE,
                    expected_version: int | None = None) -> SessionInfo:
        return await self._run(True, ops.reset, session_id, namespace, expected_version)

    async def fork(self, source_id: str, new_id: str, *, namespace: str = DEFAULT_NAMESPACE,
                   new_namespace: str | None = None, turn: int | None = None) -> SessionInfo:
        return await self._run(True, ops.fork, source_id, new_id, namespace, new_namespace, turn)

    async def delete(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        await self._run(True, ops.delete_session, session_id, namespace)

    async def list_sessions(self, *, namespace: str | None = DEFAULT_NAMESPACE, limit: int = 100,
                            offset: int = 0) -> list[SessionInfo]:
        return await self._run(False, ops.list_sessions, namespace, limit, offset)

    async def list_turns(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> list[TurnInfo]:
        return await self._run(False, ops.list_turns, session_id, namespace)

    async def stats(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionStats:
        return await self._run(False, ops.stats, session_id, namespace)

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> AsyncSQLSessionStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def open_store(url: str | URL | None = None, **kwargs: Any) -> SQLSessionStore:
    """Open a sync store (see :class:`SQLSessionStore` for the options)."""
    return SQLSessionStore(url, **kwargs)


async def open_async_store(url: str | URL | None = None, **kwargs: Any) -> AsyncSQLSessionStore:
    """Open an async store and migrate it (see :class:`SQLSessionStore` for the options)."""
    return await AsyncSQLSessionStore(url, **kwargs).open()
