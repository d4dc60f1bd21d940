"""The relational schema of the session store (SQLAlchemy 2.x typed declarative).

These classes are the *description* the queries in :mod:`.ops` are written against. The tables themselves are
created by the versioned SQL migrations in ``store/migrations/`` (see :mod:`.migrate`), never by
``metadata.create_all``: a deployed database must only change through a migration. A test checks that the
migrated database matches this module, so the two cannot drift apart unnoticed.

Layout (``session_pk`` is the surrogate key of ``sessions``; every child row cascades on delete, and the store
also deletes children explicitly so correctness never depends on the cascade being enabled):

* ``sessions``         one header row per ``(namespace, session_id)``; ``version`` for optimistic concurrency,
  ``turn`` the latest turn.
* ``snapshots``        one row per kept turn, with counts that let a load verify it found the whole turn.
* ``state_tensors``    the state after a turn, one row per tensor (raw bytes + dtype + shape + SHA-256).
* ``written_messages`` which history messages were written in which turn. Kept for *every* turn up to the latest,
  even when the snapshot of that turn was pruned: the written record is cumulative.
* ``window_messages``  the text window after a turn.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "BlobType",
    "CHILD_TABLES",
    "JSONType",
    "PKType",
    "SessionRow",
    "SnapshotRow",
    "StateTensorRow",
    "Timestamp",
    "WindowMessageRow",
    "WrittenMessageRow",
]

#: JSON documents: JSONB on PostgreSQL (indexable, compact), TEXT-backed JSON on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")
#: Surrogate keys: BIGINT identity on PostgreSQL; SQLite needs exactly ``INTEGER PRIMARY KEY`` for a rowid alias.
PKType = BigInteger().with_variant(Integer(), "sqlite")
#: Raw tensor bytes.
BlobType = LargeBinary().with_variant(BYTEA(), "postgresql")
#: All timestamps are timezone-aware UTC (SQLite keeps them as ISO text; the store re-attaches UTC on read).
Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base of the store's tables (its ``metadata`` holds nothing else)."""


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint("namespace", "session_id", name="uq_sessions_namespace_session_id"),
        # list_sessions: newest first, within a namespace or across all of them.
        Index("ix_sessions_namespace_updated_at", "namespace", "updated_at"),
        Index("ix_sessions_updated_at", "updated_at"),
        {"sqlite_autoincrement": True},  # never reuse a deleted session's key
    )

    id: Mapped[int] = mapped_column(PKType, Identity(), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(128))
    namespace: Mapped[str] = mapped_column(String(128))
    model_fingerprint: Mapped[str] = mapped_column(Text)
    adapter_fingerprint: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(BigInteger)
    turn: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    # ``metadata`` is reserved by the declarative API, hence the attribute name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)
    # Seals namespace, session_id, fingerprints and metadata (store.digests.header_digest). Schema 2.
    header_digest: Mapped[str] = mapped_column(String(64), server_default=text("''"))


class SnapshotRow(Base):
    __tablename__ = "snapshots"

    session_pk: Mapped[int] = mapped_column(
        PKType, ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    turn: Mapped[int] = mapped_column(Integer, primary_key=True)  # (session_pk, turn) is unique
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    written_count: Mapped[int] = mapped_column(Integer)  # records written in turns 1..turn
    # What the turn's rows must add up to; a load that finds anything else raises CorruptSessionError.
    tensor_count: Mapped[int] = mapped_column(Integer)
    state_bytes: Mapped[int] = mapped_column(BigInteger)
    window_count: Mapped[int] = mapped_column(Integer)
    # Schema 2 (store.digests): the record summary a turn needs without reading the record, the chains the
    # record must hash to, the digests of the turn's child rows, and the digest sealing all of this row.
    written_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    first_digest: Mapped[str] = mapped_column(String(128), server_default=text("''"))
    history_digest: Mapped[str] = mapped_column(String(64), server_default=text("''"))
    record_digest: Mapped[str] = mapped_column(String(64), server_default=text("''"))
    tensors_digest: Mapped[str] = mapped_column(String(64), server_default=text("''"))
    window_digest: Mapped[str] = mapped_column(String(64), server_default=text("''"))
    digest: Mapped[str] = mapped_column(String(64), server_default=text("''"))  # "" = not sealed


class StateTensorRow(Base):
    __tablename__ = "state_tensors"
    __table_args__ = (
        ForeignKeyConstraint(
            ["session_pk", "turn"], ["snapshots.session_pk", "snapshots.turn"], ondelete="CASCADE",
            name="fk_state_tensors_snapshot",
        ),
        UniqueConstraint("session_pk", "turn", "name", name="uq_state_tensors_name"),
    )

    session_pk: Mapped[int] = mapped_column(PKType, primary_key=True)
    turn: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # keeps the engine's tensor order
    name: Mapped[str] = mapped_column(String(256))
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSONType)
    data: Mapped[bytes] = mapped_column(BlobType)
    checksum: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of data


class WrittenMessageRow(Base):
    __tablename__ = "written_messages"

    session_pk: Mapped[int] = mapped_column(
        PKType, ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    turn: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_index: Mapped[int] = mapped_column(Integer, primary_key=True)  # position in the history
    role: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(128))
    tokens: Mapped[int] = mapped_column(Integer)


class WindowMessageRow(Base):
    __tablename__ = "window_messages"
    __table_args__ = (
        ForeignKeyConstraint(
            ["session_pk", "turn"], ["snapshots.session_pk", "snapshots.turn"], ondelete="CASCADE",
            name="fk_window_messages_snapshot",
        ),
    )

    session_pk: Mapped[int] = mapped_column(PKType, primary_key=True)
    turn: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # order in the window
    message_index: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)


#: Child tables, in the order a delete must visit them (children of snapshots first).
CHILD_TABLES = (StateTensorRow, WindowMessageRow, WrittenMessageRow, SnapshotRow)
