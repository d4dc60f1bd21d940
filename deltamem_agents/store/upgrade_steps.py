"""Python steps that run inside a migration's transaction, after its SQL (see :mod:`.migrate`).

Version 2 (``0002_digests``) adds the digests of :mod:`.digests`. Rows written under schema 1 have none, so
this step **backfills** them: every existing turn is first checked as schema 1 could check it — each blob's
SHA-256 and size against dtype × shape, the snapshot's counts, a written record numbered 0, 1, 2, … — and is
sealed only if it passes. A turn that fails stays unsealed (``digest = ''``) and every later load of it raises
:class:`~deltamem_agents.store.errors.CorruptSessionError`: damage that existed before the upgrade is reported,
never blessed. What schema 1 could not see (a same-size dtype change, an edited window text or record digest
made before the upgrade) cannot be told apart from the original and is sealed as found; from the upgrade on,
any such edit is detected.

Backfilling rather than marking old rows "unverified" keeps one load path: a turn needs the record summary
(count, tokens, chains) in its snapshot row, and only the backfill can put it there.

The queries here name the version-2 columns literally (not :mod:`.schema`, which follows the latest schema), so
this step keeps working when later migrations change the tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    Integer,
    LargeBinary,
    String,
    Text,
    column,
    select,
    table,
    update,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB

from .base import CorruptStateError, WindowMessage, WrittenMessage
from .codec import SnapshotFacts, verify_blob
from .digests import EMPTY_CHAIN, extend_history, extend_records, header_digest, tensors_digest, window_digest

__all__ = ["STEPS", "seal_schema1_rows"]

logger = logging.getLogger(__name__)

_JSON = JSON().with_variant(JSONB(), "postgresql")
_SESSIONS = table(
    "sessions", column("id", BigInteger), column("namespace", String), column("session_id", String),
    column("model_fingerprint", Text), column("adapter_fingerprint", Text), column("metadata", _JSON),
    column("header_digest", String),
)
_SNAPSHOTS = table(
    "snapshots", column("session_pk", BigInteger), column("turn", Integer), column("written_count", Integer),
    column("tensor_count", Integer), column("state_bytes", BigInteger), column("window_count", Integer),
    *(column(c, String) for c in ("first_digest", "history_digest", "record_digest", "tensors_digest",
                                  "window_digest", "digest")),
    column("written_tokens", BigInteger),
)
_TENSORS = table(
    "state_tensors", column("session_pk", BigInteger), column("turn", Integer), column("position", Integer),
    column("name", String), column("dtype", String), column("shape", _JSON),
    column("data", LargeBinary().with_variant(BYTEA(), "postgresql")), column("checksum", String),
)
_WRITTEN = table(
    "written_messages", column("session_pk", BigInteger), column("turn", Integer), column("message_index", Integer),
    column("role", String), column("digest", String), column("tokens", Integer),
)
_WINDOW = table(
    "window_messages", column("session_pk", BigInteger), column("turn", Integer), column("position", Integer),
    column("message_index", Integer), column("role", String), column("content", Text), column("tokens", Integer),
)


def _seal_turn(conn: Connection, pk: int, snap, records: list[WrittenMessage]) -> SnapshotFacts | None:
    """The facts of one schema-1 turn if it passes schema 1's checks, else None (``records``: turns ≤ it)."""
    if [r.index for r in records] != list(range(len(records))) or len(records) != snap.written_count:
        return None
    try:
        state = [
            verify_blob(r.name, r.dtype, r.shape, r.data, r.checksum)
            for r in conn.execute(select(_TENSORS).where(_TENSORS.c.session_pk == pk, _TENSORS.c.turn == snap.turn)
                                  .order_by(_TENSORS.c.position))
        ]
    except CorruptStateError:
        return None
    window = [
        WindowMessage(r.message_index, r.role, r.content, r.tokens)
        for r in conn.execute(select(_WINDOW).where(_WINDOW.c.session_pk == pk, _WINDOW.c.turn == snap.turn)
                              .order_by(_WINDOW.c.position))
    ]
    if (len(state), sum(len(b.data) for b in state), len(window)) != (
            snap.tensor_count, snap.state_bytes, snap.window_count):
        return None
    return SnapshotFacts(
        turn=snap.turn, written_count=len(records), written_tokens=sum(r.tokens for r in records),
        first_digest=records[0].digest if records else "",
        history_digest=extend_history(EMPTY_CHAIN, (r.digest for r in records)),
        record_digest=extend_records(EMPTY_CHAIN, records), tensor_count=len(state),
        state_bytes=sum(len(b.data) for b in state), window_count=len(window),
        tensors_digest=tensors_digest([(b.name, b.dtype, b.shape, b.checksum) for b in state]),
        window_digest=window_digest(window),
    )


def seal_schema1_rows(conn: Connection) -> None:
    """Backfill header and snapshot digests of every schema-1 row (see the module docstring)."""
    sealed = unsealed = 0
    for s in conn.execute(select(_SESSIONS).order_by(_SESSIONS.c.id)).all():
        meta = s.metadata
        conn.execute(update(_SESSIONS).where(_SESSIONS.c.id == s.id).values(header_digest=header_digest(
            s.namespace, s.session_id, s.model_fingerprint, s.adapter_fingerprint, dict(meta or {}))))
        records = [
            (r.turn, WrittenMessage(r.message_index, r.role, r.digest, r.tokens))
            for r in conn.execute(select(_WRITTEN).where(_WRITTEN.c.session_pk == s.id)
                                  .order_by(_WRITTEN.c.turn, _WRITTEN.c.message_index))
        ]
        for snap in conn.execute(select(_SNAPSHOTS).where(_SNAPSHOTS.c.session_pk == s.id)
                                 .order_by(_SNAPSHOTS.c.turn)).all():
            facts = _seal_turn(conn, s.id, snap, [r for t, r in records if t <= snap.turn])
            if facts is None:
                unsealed += 1
                logger.warning("session %s/%s turn %d failed verification during the upgrade to schema 2; it "
                               "stays unsealed and will not load", s.namespace, s.session_id, snap.turn)
                continue
            sealed += 1
            values = facts.columns()
            for key in ("turn", "written_count", "tensor_count", "state_bytes", "window_count"):
                values.pop(key)
            conn.execute(update(_SNAPSHOTS).where(_SNAPSHOTS.c.session_pk == s.id, _SNAPSHOTS.c.turn == snap.turn)
                         .values(**values))
    if sealed or unsealed:
        logger.info("schema 2: sealed %d existing turns, %d left unsealed", sealed, unsealed)


#: Migration version -> the Python step run after its SQL, in the same transaction.
STEPS: dict[int, Callable[[Connection], None]] = {2: seal_schema1_rows}
