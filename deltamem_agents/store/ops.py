"""Every store operation, written once against a *sync* SQLAlchemy ``Connection``.

The sync store calls these directly; the async store runs the very same functions on its connection through
``AsyncConnection.run_sync``. So the two stores share all SQL and all checks and cannot drift apart.

Each operation runs inside one transaction opened by :func:`run_in_transaction`:

* writes: SQLite ``BEGIN IMMEDIATE`` (the database write lock, taken up front); PostgreSQL ``READ COMMITTED``
  plus ``SELECT … FOR UPDATE`` on the session's header row, which every mutation of a session takes first, so
  mutations of one session queue behind each other while other sessions proceed in parallel.
* reads: SQLite deferred ``BEGIN`` (WAL gives the transaction one consistent snapshot); PostgreSQL
  ``REPEATABLE READ``, so a load sees one consistent turn even while a commit or rollback runs beside it.

Optimistic concurrency is the conditional ``UPDATE sessions SET version = version + 1 … WHERE version =
:expected`` of the contract: a stale ``expected_version`` raises :class:`ConcurrentUpdateError` before any row
is written, and any error rolls the whole transaction back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Row, Table, delete, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError

from .base import (
    ConcurrentUpdateError,
    CorruptSessionError,
    CorruptStateError,
    SessionData,
    SessionExistsError,
    SessionInfo,
    SessionNotFoundError,
    SessionStats,
    TensorBlob,
    TurnInfo,
    WindowMessage,
    WrittenMessage,
    validate_identifier,
)
from .codec import (
    SnapshotFacts,
    check_continues,
    check_fingerprints,
    prepare_metadata,
    prepare_state,
    prepare_window,
    prepare_written,
    record_problem,
    verify_blob,
)
from .connect import WRITE_OPTION
from .digests import header_digest, tensors_digest, window_digest
from .schema import SessionRow, SnapshotRow, StateTensorRow, WindowMessageRow, WrittenMessageRow

__all__ = [
    "SESSIONS",
    "SNAPSHOTS",
    "SNAPSHOT_TABLES",
    "TENSORS",
    "WINDOW",
    "WRITTEN",
    "commit",
    "create",
    "delete_session",
    "exists",
    "fork",
    "get",
    "list_sessions",
    "list_turns",
    "load",
    "reset",
    "rollback",
    "run_in_transaction",
    "stats",
]

T = TypeVar("T")

SESSIONS = cast(Table, SessionRow.__table__)
SNAPSHOTS = cast(Table, SnapshotRow.__table__)
TENSORS = cast(Table, StateTensorRow.__table__)
WRITTEN = cast(Table, WrittenMessageRow.__table__)
WINDOW = cast(Table, WindowMessageRow.__table__)
#: Tables keyed by (session_pk, turn) that belong to a snapshot, children before parents.
SNAPSHOT_TABLES = (TENSORS, WINDOW, SNAPSHOTS)


# ---------------------------------------------------------------------------------------------- transactions
def run_in_transaction(conn: Connection, write: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(conn, *args, **kwargs)`` in one transaction of the right kind; commit, or roll back on error."""
    conn.execution_options(**{WRITE_OPTION: write})
    if conn.dialect.name == "postgresql":
        conn.execution_options(isolation_level="READ COMMITTED" if write else "REPEATABLE READ")
    with conn.begin():
        return fn(conn, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- helpers
def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    """Timestamps as aware UTC: SQLite hands them back naive (they were written as UTC), PostgreSQL in the
    connection's time zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _label(namespace: str, session_id: str) -> str:
    return f"session {session_id!r} in namespace {namespace!r}"


def _info(row: Row) -> SessionInfo:
    meta = _metadata_of(row)
    return SessionInfo(
        session_id=row.session_id,
        namespace=row.namespace,
        model_fingerprint=row.model_fingerprint,
        adapter_fingerprint=row.adapter_fingerprint,
        version=int(row.version),
        turn=int(row.turn),
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
        metadata=meta,
    )


def _header(conn: Connection, namespace: str, session_id: str, *, lock: str | None = None) -> Row | None:
    """The session's header row; ``lock`` = "update" / "share" locks it on PostgreSQL (SQLite is already
    serialised by ``BEGIN IMMEDIATE``)."""
    validate_identifier(namespace, "namespace")
    validate_identifier(session_id, "session id")
    stmt = select(SESSIONS).where(SESSIONS.c.namespace == namespace, SESSIONS.c.session_id == session_id)
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(read=lock == "share")
    return conn.execute(stmt).first()


def _require(conn: Connection, namespace: str, session_id: str, *, lock: str | None = None,
             verify: bool = False) -> Row:
    """The header row or :class:`SessionNotFoundError`; ``verify`` checks its digest (identity, fingerprints,
    metadata) — every path that hands a session's data to a caller, or writes on top of it, does."""
    row = _header(conn, namespace, session_id, lock=lock)
    if row is None:
        raise SessionNotFoundError(f"{_label(namespace, session_id)} not found")
    if verify and row.header_digest != _header_digest_of(row):
        raise CorruptSessionError(
            f"{_label(namespace, session_id)}: its header (fingerprints or metadata) does not match its digest "
            "(altered or damaged)", namespace=namespace, session_id=session_id,
        )
    return row


def _metadata_of(row: Row) -> dict[str, Any]:
    meta = row.metadata
    if isinstance(meta, str):  # defensive: a driver that does not decode JSON
        meta = json.loads(meta)
    return dict(meta or {})


def _header_digest_of(row: Row) -> str:
    return header_digest(row.namespace, row.session_id, row.model_fingerprint, row.adapter_fingerprint,
                         _metadata_of(row))


def _seal_header(conn: Connection, pk: int) -> SessionInfo:
    """Compute the new header's digest from the row as the database hands it back, store it, return the info."""
    row = conn.execute(select(SESSIONS).where(SESSIONS.c.id == pk)).one()
    conn.execute(update(SESSIONS).where(SESSIONS.c.id == pk).values(header_digest=_header_digest_of(row)))
    return _info(row)


def _verified_facts(header: Row, snap: Row) -> SnapshotFacts:
    """The snapshot row's facts, after checking them against its digest (the row alone, no children read)."""
    facts = SnapshotFacts.from_row(snap)
    if not snap.digest:
        raise _corrupt(header, snap.turn, "the turn is not sealed: it failed verification when the database was "
                       "upgraded to digests (schema 2), or its digest was erased")
    if facts.digest() != snap.digest:
        raise _corrupt(header, snap.turn, "its snapshot row (counts or record chains) does not match its digest")
    return facts


def _corrupt(header: Row, turn: int, what: str) -> CorruptSessionError:
    return CorruptSessionError(f"turn {turn} of {_label(header.namespace, header.session_id)}: {what}",
                               namespace=header.namespace, session_id=header.session_id, turn=turn)


def _snapshot(conn: Connection, header: Row, turn: int) -> Row:
    """The snapshot row of ``turn``, or :class:`SessionNotFoundError` when that turn is not kept."""
    if not isinstance(turn, int) or isinstance(turn, bool):
        raise TypeError(f"turn must be an int, got {type(turn).__name__}")
    row = None
    if 0 <= turn <= header.turn:
        row = conn.execute(
            select(SNAPSHOTS).where(SNAPSHOTS.c.session_pk == header.id, SNAPSHOTS.c.turn == turn)
        ).first()
    if row is None:
        raise SessionNotFoundError(
            f"turn {turn} of {_label(header.namespace, header.session_id)} is not kept "
            f"(latest turn: {header.turn})"
        )
    return row


def _check_version(header: Row, expected_version: int | None) -> None:
    if expected_version is not None and header.version != expected_version:
        raise ConcurrentUpdateError(
            f"{_label(header.namespace, header.session_id)} is at version {header.version}, "
            f"expected {expected_version}: reload and retry"
        )


def _bump(conn: Connection, header: Row, *, turn: int, now: datetime) -> SessionInfo:
    """The contract's conditional version bump; the header as it is after it."""
    result = conn.execute(
        update(SESSIONS)
        .where(SESSIONS.c.id == header.id, SESSIONS.c.version == header.version)
        .values(version=SESSIONS.c.version + 1, turn=turn, updated_at=now)
    )
    if result.rowcount != 1:
        raise ConcurrentUpdateError(
            f"{_label(header.namespace, header.session_id)} changed while it was being written: reload and retry"
        )
    return _info(conn.execute(select(SESSIONS).where(SESSIONS.c.id == header.id)).one())


def _delete_turns(conn: Connection, pk: int, *, after: int | None = None, before: int | None = None,
                  written: bool = True) -> None:
    """Delete the rows of turns ``> after`` and/or ``< before`` (all turns when both are None).

    Written records go too unless ``written=False`` (pruning keeps them: the written record is cumulative).
    Children are deleted before their snapshot so nothing relies on ``ON DELETE CASCADE``.
    """
    tables = (*SNAPSHOT_TABLES[:2], WRITTEN, SNAPSHOTS) if written else SNAPSHOT_TABLES
    for table in tables:
        stmt = delete(table).where(table.c.session_pk == pk)
        if after is not None:
            stmt = stmt.where(table.c.turn > after)
        if before is not None:
            stmt = stmt.where(table.c.turn < before)
        conn.execute(stmt)


def _insert_turn(conn: Connection, pk: int, facts: SnapshotFacts, *, state: Sequence[TensorBlob],
                 written: Sequence[WrittenMessage], window: Sequence[WindowMessage], now: datetime) -> None:
    turn = facts.turn
    conn.execute(insert(SNAPSHOTS).values(session_pk=pk, created_at=now, **facts.columns()))
    # executemany with an empty parameter list is an error in some drivers, hence the guards.
    if state:
        conn.execute(insert(TENSORS), [
            {"session_pk": pk, "turn": turn, "position": i, "name": b.name, "dtype": b.dtype,
             "shape": list(b.shape), "data": b.data, "checksum": b.checksum}
            for i, b in enumerate(state)
        ])
    if written:
        conn.execute(insert(WRITTEN), [
            {"session_pk": pk, "turn": turn, "message_index": m.index, "role": m.role, "digest": m.digest,
             "tokens": m.tokens}
            for m in written
        ])
    if window:
        conn.execute(insert(WINDOW), [
            {"session_pk": pk, "turn": turn, "position": i, "message_index": m.index, "role": m.role,
             "content": m.content, "tokens": m.tokens}
            for i, m in enumerate(window)
        ])


def _prune(conn: Connection, pk: int, max_snapshots: int | None) -> None:
    """Keep the newest ``max_snapshots`` snapshots (the latest always survives; written records all stay)."""
    if max_snapshots is None:
        return
    cutoff = conn.execute(
        select(SNAPSHOTS.c.turn).where(SNAPSHOTS.c.session_pk == pk)
        .order_by(SNAPSHOTS.c.turn.desc()).limit(1).offset(max_snapshots - 1)
    ).scalar()
    if cutoff is not None:
        _delete_turns(conn, pk, before=cutoff, written=False)


# ---------------------------------------------------------------------------------------------- operations
def create(conn: Connection, session_id: str, namespace: str, model_fingerprint: str,
           adapter_fingerprint: str, metadata: dict[str, Any] | None) -> SessionInfo:
    meta = prepare_metadata(metadata)
    check_fingerprints(model_fingerprint, adapter_fingerprint)
    if _header(conn, namespace, session_id) is not None:
        raise SessionExistsError(f"{_label(namespace, session_id)} already exists")
    now = _now()
    try:
        pk = conn.execute(
            insert(SESSIONS).values(
                session_id=session_id, namespace=namespace, model_fingerprint=model_fingerprint,
                adapter_fingerprint=adapter_fingerprint, version=1, turn=0, created_at=now, updated_at=now,
                metadata=meta, header_digest="",
            )
        ).inserted_primary_key[0]
    except IntegrityError as exc:  # lost a race with another create of the same id (PostgreSQL)
        raise SessionExistsError(f"{_label(namespace, session_id)} already exists") from exc
    _insert_turn(conn, pk, SnapshotFacts.fresh(), state=[], written=[], window=[], now=now)
    return _seal_header(conn, pk)


def get(conn: Connection, session_id: str, namespace: str) -> SessionInfo:
    return _info(_require(conn, namespace, session_id))


def exists(conn: Connection, session_id: str, namespace: str) -> bool:
    return _header(conn, namespace, session_id) is not None


def load(conn: Connection, session_id: str, namespace: str, turn: int | None,
         full_record: bool = False) -> SessionData:
    """One turn, verified: the header's digest, the snapshot row's digest, every blob's checksum, the tensor
    table and the window against the row's digests (and with ``full_record`` the record against its chain).
    The written rows are read only when ``full_record`` asks: a turn needs just the summary in the row."""
    if not isinstance(full_record, bool):
        raise TypeError("full_record must be a bool")
    header = _require(conn, namespace, session_id, verify=True)
    snap = _snapshot(conn, header, header.turn if turn is None else turn)
    facts = _verified_facts(header, snap)
    pk, k = header.id, snap.turn

    try:
        state = [
            verify_blob(r.name, r.dtype, r.shape, r.data, r.checksum)
            for r in conn.execute(
                select(TENSORS).where(TENSORS.c.session_pk == pk, TENSORS.c.turn == k).order_by(TENSORS.c.position)
            )
        ]
    except CorruptStateError as exc:
        raise _corrupt(header, k, str(exc)) from exc
    window = [
        WindowMessage(index=r.message_index, role=r.role, content=r.content, tokens=r.tokens)
        for r in conn.execute(
            select(WINDOW).where(WINDOW.c.session_pk == pk, WINDOW.c.turn == k).order_by(WINDOW.c.position)
        )
    ]
    # The snapshot row says what the turn holds; anything else means rows were lost, added or altered.
    found = (len(state), sum(len(b.data) for b in state), len(window))
    wanted = (facts.tensor_count, facts.state_bytes, facts.window_count)
    if found != wanted:
        raise _corrupt(header, k, f"the turn is incomplete: found (tensors, state bytes, window) = {found}, "
                                  f"the snapshot records {wanted}")
    if tensors_digest([(b.name, b.dtype, b.shape, b.checksum) for b in state]) != facts.tensors_digest:
        raise _corrupt(header, k, "a state tensor's name, dtype, shape or checksum was altered "
                                  "(tensor table digest mismatch)")
    if window_digest(window) != facts.window_digest:
        raise _corrupt(header, k, "a window message's text, role, index or token count was altered "
                                  "(window digest mismatch)")
    written = None
    if full_record:
        written = [
            WrittenMessage(index=r.message_index, role=r.role, digest=r.digest, tokens=r.tokens)
            for r in conn.execute(
                select(WRITTEN).where(WRITTEN.c.session_pk == pk, WRITTEN.c.turn <= k)
                .order_by(WRITTEN.c.turn, WRITTEN.c.message_index)
            )
        ]
        problem = record_problem(written, facts)
        if problem:
            raise _corrupt(header, k, f"the written record does not verify: {problem}")
    return SessionData(info=_info(header), turn=k, state=state, written=written, window=window,
                       record=facts.summary())


def commit(conn: Connection, session_id: str, namespace: str, expected_version: int,
           state: Sequence[TensorBlob], written: Sequence[WrittenMessage], window: Sequence[WindowMessage],
           base_turn: int | None, max_snapshots: int | None) -> SessionInfo:
    # Validate everything first: a bad offer must write nothing.
    if not isinstance(expected_version, int) or isinstance(expected_version, bool):
        raise TypeError("expected_version must be an int")
    blobs, records, messages = prepare_state(state), prepare_written(written), prepare_window(window)

    header = _require(conn, namespace, session_id, lock="update", verify=True)
    _check_version(header, expected_version)
    base = _snapshot(conn, header, header.turn if base_turn is None else base_turn)
    base_facts = _verified_facts(header, base)  # never commit on top of a damaged turn
    check_continues(records, base_facts.written_count)
    now = _now()
    new_turn = base.turn + 1
    info = _bump(conn, header, turn=new_turn, now=now)
    if base.turn < header.turn:  # replay after a diverging history: later turns go, in this transaction
        _delete_turns(conn, header.id, after=base.turn)
    _insert_turn(conn, header.id, base_facts.after(new_turn, blobs, records, messages), state=blobs,
                 written=records, window=messages, now=now)
    _prune(conn, header.id, max_snapshots)
    return info


def rollback(conn: Connection, session_id: str, namespace: str, turn: int,
             expected_version: int | None) -> SessionInfo:
    header = _require(conn, namespace, session_id, lock="update")
    _check_version(header, expected_version)
    snap = _snapshot(conn, header, turn)
    info = _bump(conn, header, turn=snap.turn, now=_now())
    _delete_turns(conn, header.id, after=snap.turn)
    return info


def reset(conn: Connection, session_id: str, namespace: str, expected_version: int | None) -> SessionInfo:
    header = _require(conn, namespace, session_id, lock="update")
    _check_version(header, expected_version)
    now = _now()
    info = _bump(conn, header, turn=0, now=now)
    _delete_turns(conn, header.id)
    _insert_turn(conn, header.id, SnapshotFacts.fresh(), state=[], written=[], window=[], now=now)
    return info


def fork(conn: Connection, source_id: str, new_id: str, namespace: str, new_namespace: str | None,
         turn: int | None) -> SessionInfo:
    target_ns = namespace if new_namespace is None else new_namespace
    validate_identifier(target_ns, "namespace")
    validate_identifier(new_id, "session id")
    # A share lock keeps the source's mutations out while we copy, without blocking its readers.
    src = _require(conn, namespace, source_id, lock="share", verify=True)
    snap = _snapshot(conn, src, src.turn if turn is None else turn)
    _verified_facts(src, snap)
    if _header(conn, target_ns, new_id) is not None:
        raise SessionExistsError(f"{_label(target_ns, new_id)} already exists")
    now = _now()
    try:
        pk = conn.execute(
            insert(SESSIONS).values(
                session_id=new_id, namespace=target_ns, model_fingerprint=src.model_fingerprint,
                adapter_fingerprint=src.adapter_fingerprint, version=1, turn=snap.turn, created_at=now,
                updated_at=now, metadata=src.metadata, header_digest="",
            )
        ).inserted_primary_key[0]
    except IntegrityError as exc:
        raise SessionExistsError(f"{_label(target_ns, new_id)} already exists") from exc
    # Copy in the database (INSERT … SELECT): blobs never travel through Python.
    for table in (SNAPSHOTS, TENSORS, WRITTEN, WINDOW):  # parents before children
        columns = [c for c in table.c if c.name != "session_pk"]
        source = select(literal(pk, SESSIONS.c.id.type).label("session_pk"), *columns).where(
            table.c.session_pk == src.id, table.c.turn <= snap.turn
        )
        conn.execute(insert(table).from_select(["session_pk", *(c.name for c in columns)], source))
    # Snapshot digests do not name the session, so the copied rows stay valid; the header is the fork's own.
    return _seal_header(conn, pk)


def delete_session(conn: Connection, session_id: str, namespace: str) -> None:
    header = _require(conn, namespace, session_id, lock="update")
    _delete_turns(conn, header.id)
    conn.execute(delete(SESSIONS).where(SESSIONS.c.id == header.id))


def list_sessions(conn: Connection, namespace: str | None, limit: int, offset: int) -> list[SessionInfo]:
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be non-negative")
    stmt = select(SESSIONS)
    if namespace is not None:
        stmt = stmt.where(SESSIONS.c.namespace == validate_identifier(namespace, "namespace"))
    # id breaks ties between equal timestamps so that pagination is stable.
    stmt = stmt.order_by(SESSIONS.c.updated_at.desc(), SESSIONS.c.id.desc()).limit(limit).offset(offset)
    return [_info(row) for row in conn.execute(stmt)]


def list_turns(conn: Connection, session_id: str, namespace: str) -> list[TurnInfo]:
    header = _require(conn, namespace, session_id)
    rows = conn.execute(
        select(SNAPSHOTS).where(SNAPSHOTS.c.session_pk == header.id).order_by(SNAPSHOTS.c.turn)
    )
    return [
        TurnInfo(turn=r.turn, created_at=_utc(r.created_at), written_count=r.written_count,
                 state_bytes=int(r.state_bytes))
        for r in rows
    ]


def stats(conn: Connection, session_id: str, namespace: str) -> SessionStats:
    header = _require(conn, namespace, session_id)
    pk = header.id
    turns, stored, latest_bytes, latest_window = conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(SNAPSHOTS.c.state_bytes), 0),
            func.coalesce(func.max(SNAPSHOTS.c.state_bytes).filter(SNAPSHOTS.c.turn == header.turn), 0),
            func.coalesce(func.max(SNAPSHOTS.c.window_count).filter(SNAPSHOTS.c.turn == header.turn), 0),
        ).where(SNAPSHOTS.c.session_pk == pk)
    ).one()
    n_written, tokens = conn.execute(
        select(func.count(), func.coalesce(func.sum(WRITTEN.c.tokens), 0)).where(
            WRITTEN.c.session_pk == pk, WRITTEN.c.turn <= header.turn
        )
    ).one()
    return SessionStats(
        info=_info(header), turns=int(turns), written_messages=int(n_written), written_tokens=int(tokens),
        window_messages=int(latest_window), state_bytes=int(latest_bytes), stored_bytes=int(stored),
    )
