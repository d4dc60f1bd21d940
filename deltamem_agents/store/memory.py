"""`InMemorySessionStore`: the store contract (:mod:`.base`) in a Python dict, for tests and throw-away use.

Same semantics as the SQL store — versions, turns as snapshots, ``base_turn`` replays, fork, prune — and the
same validation (it reuses :mod:`.codec`), so code tested against it behaves the same on SQLite or PostgreSQL.
Thread-safe (one lock around every operation); nothing survives the process.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from .base import (
    DEFAULT_NAMESPACE,
    ConcurrentUpdateError,
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
)

__all__ = ["InMemorySessionStore"]


@dataclass
class _Turn:
    turn: int
    created_at: datetime
    facts: SnapshotFacts  # counts and record chains, as the SQL store's snapshot row
    state: list[TensorBlob]
    written: list[WrittenMessage]  # records written *in* this turn
    window: list[WindowMessage]


@dataclass
class _Session:
    info: SessionInfo
    seq: int  # creation order: breaks ties between equal timestamps like the SQL store's never-reused id
    turns: dict[int, _Turn] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC)


def _label(namespace: str, session_id: str) -> str:
    return f"session {namespace}/{session_id}"


class InMemorySessionStore:
    """A :class:`~deltamem_agents.store.base.SessionStore` kept in memory.

    Args:
        max_snapshots: keep at most this many snapshots per session (the latest always survives; written
            records are never pruned), like the SQL store's option; ``None`` keeps every turn.
    """

    def __init__(self, *, max_snapshots: int | None = None) -> None:
        if max_snapshots is not None and (not isinstance(max_snapshots, int) or max_snapshots < 1):
            raise ValueError(f"max_snapshots must be None or an int >= 1, got {max_snapshots!r}")
        self.max_snapshots = max_snapshots
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._seq = itertools.count()

    # -- helpers --------------------------------------------------------------------------------------------
    def _key(self, session_id: str, namespace: str) -> tuple[str, str]:
        if self._closed:
            raise RuntimeError("the store is closed")
        return validate_identifier(namespace, "namespace"), validate_identifier(session_id, "session id")

    def _require(self, session_id: str, namespace: str) -> _Session:
        key = self._key(session_id, namespace)
        sess = self._sessions.get(key)
        if sess is None:
            raise SessionNotFoundError(f"{_label(*key)} not found")
        return sess

    @staticmethod
    def _snapshot(sess: _Session, turn: int) -> _Turn:
        if not isinstance(turn, int) or isinstance(turn, bool):
            raise TypeError(f"turn must be an int, got {type(turn).__name__}")
        snap = sess.turns.get(turn) if 0 <= turn <= sess.info.turn else None
        if snap is None:
            raise SessionNotFoundError(
                f"turn {turn} of {_label(sess.info.namespace, sess.info.session_id)} is not kept "
                f"(latest turn: {sess.info.turn})"
            )
        return snap

    @staticmethod
    def _check_version(sess: _Session, expected_version: int | None) -> None:
        if expected_version is not None and sess.info.version != expected_version:
            raise ConcurrentUpdateError(
                f"{_label(sess.info.namespace, sess.info.session_id)} is at version {sess.info.version}, "
                f"expected {expected_version}: reload and retry"
            )

    @staticmethod
    def _bump(sess: _Session, turn: int) -> SessionInfo:
        sess.info = replace(sess.info, version=sess.info.version + 1, turn=turn, updated_at=_now())
        return sess.info

    def _prune(self, sess: _Session) -> None:
        if self.max_snapshots is None:
            return
        kept = sorted(sess.turns)
        for t in kept[: max(0, len(kept) - self.max_snapshots)]:
            # The written record is cumulative and never pruned: hand the pruned turn's records to the next
            # kept turn, so that load() of any kept turn still returns every record up to it.
            snap = sess.turns[t]
            if snap.written:
                nxt = min(k for k in sess.turns if k > t)
                sess.turns[nxt].written = snap.written + sess.turns[nxt].written
            del sess.turns[t]

    @staticmethod
    def _records_upto(sess: _Session, turn: int) -> list[WrittenMessage]:
        out: list[WrittenMessage] = []
        for t in sorted(sess.turns):
            if t <= turn:
                out.extend(sess.turns[t].written)
        return out

    # -- the contract ---------------------------------------------------------------------------------------
    def create(
        self,
        session_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        model_fingerprint: str,
        adapter_fingerprint: str,
        metadata: dict[str, Any] | None = None,
    ) -> SessionInfo:
        with self._lock:
            key = self._key(session_id, namespace)
            meta = prepare_metadata(metadata)
            check_fingerprints(model_fingerprint, adapter_fingerprint)
            if key in self._sessions:
                raise SessionExistsError(f"{_label(*key)} already exists")
            now = _now()
            info = SessionInfo(
                session_id=session_id, namespace=namespace, model_fingerprint=model_fingerprint,
                adapter_fingerprint=adapter_fingerprint, version=1, turn=0, created_at=now, updated_at=now,
                metadata=meta,
            )
            sess = _Session(info, next(self._seq))
            sess.turns[0] = _Turn(0, now, SnapshotFacts.fresh(), [], [], [])
            self._sessions[key] = sess
            return info

    def get(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionInfo:
        with self._lock:
            return self._require(session_id, namespace).info

    def exists(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        with self._lock:
            return self._key(session_id, namespace) in self._sessions

    def load(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int | None = None,
             full_record: bool = False) -> SessionData:
        if not isinstance(full_record, bool):
            raise TypeError("full_record must be a bool")
        with self._lock:
            sess = self._require(session_id, namespace)
            snap = self._snapshot(sess, sess.info.turn if turn is None else turn)
            return SessionData(
                info=sess.info,
                turn=snap.turn,
                state=list(snap.state),
                written=self._records_upto(sess, snap.turn) if full_record else None,
                window=list(snap.window),
                record=snap.facts.summary(),
            )

    def commit(
        self,
        session_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        expected_version: int,
        state: Sequence[TensorBlob],
        written: Sequence[WrittenMessage],
        window: Sequence[WindowMessage],
        base_turn: int | None = None,
    ) -> SessionInfo:
        if not isinstance(expected_version, int) or isinstance(expected_version, bool):
            raise TypeError("expected_version must be an int")
        blobs, records, messages = prepare_state(state), prepare_written(written), prepare_window(window)
        with self._lock:
            sess = self._require(session_id, namespace)
            self._check_version(sess, expected_version)
            base = self._snapshot(sess, sess.info.turn if base_turn is None else base_turn)
            check_continues(records, base.facts.written_count)
            for t in [t for t in sess.turns if t > base.turn]:
                del sess.turns[t]
            new_turn = base.turn + 1
            info = self._bump(sess, new_turn)
            sess.turns[new_turn] = _Turn(
                new_turn, info.updated_at, base.facts.after(new_turn, blobs, records, messages), blobs, records,
                messages,
            )
            self._prune(sess)
            return info

    def rollback(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, turn: int, expected_version: int | None = None
    ) -> SessionInfo:
        with self._lock:
            sess = self._require(session_id, namespace)
            self._check_version(sess, expected_version)
            snap = self._snapshot(sess, turn)
            for t in [t for t in sess.turns if t > snap.turn]:
                del sess.turns[t]
            return self._bump(sess, snap.turn)

    def reset(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE, expected_version: int | None = None
    ) -> SessionInfo:
        with self._lock:
            sess = self._require(session_id, namespace)
            self._check_version(sess, expected_version)
            info = self._bump(sess, 0)
            sess.turns = {0: _Turn(0, info.updated_at, SnapshotFacts.fresh(), [], [], [])}
            return info

    def fork(
        self,
        source_id: str,
        new_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        new_namespace: str | None = None,
        turn: int | None = None,
    ) -> SessionInfo:
        with self._lock:
            target_key = self._key(new_id, namespace if new_namespace is None else new_namespace)
            src = self._require(source_id, namespace)
            snap = self._snapshot(src, src.info.turn if turn is None else turn)
            if target_key in self._sessions:
                raise SessionExistsError(f"{_label(*target_key)} already exists")
            now = _now()
            info = replace(
                src.info, session_id=new_id, namespace=target_key[0], version=1, turn=snap.turn,
                created_at=now, updated_at=now, metadata=copy.deepcopy(src.info.metadata),
            )
            sess = _Session(info, next(self._seq))
            for t, s in src.turns.items():  # blobs and records are immutable: sharing them is safe
                if t <= snap.turn:
                    sess.turns[t] = replace(s, state=list(s.state), written=list(s.written), window=list(s.window))
            self._sessions[target_key] = sess
            return info

    def delete(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        with self._lock:
            self._require(session_id, namespace)
            del self._sessions[self._key(session_id, namespace)]

    def list_sessions(
        self, *, namespace: str | None = DEFAULT_NAMESPACE, limit: int = 100, offset: int = 0
    ) -> list[SessionInfo]:
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be non-negative")
        with self._lock:
            if namespace is not None:
                validate_identifier(namespace, "namespace")
            found = [s for (ns, _), s in self._sessions.items() if namespace is None or ns == namespace]
            found.sort(key=lambda s: (s.info.updated_at, s.seq), reverse=True)
            return [s.info for s in found[offset : offset + limit]]

    def list_turns(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> list[TurnInfo]:
        with self._lock:
            sess = self._require(session_id, namespace)
            return [
                TurnInfo(turn=t, created_at=s.created_at, written_count=s.facts.written_count,
                         state_bytes=sum(len(b.data) for b in s.state))
                for t, s in sorted(sess.turns.items())
            ]

    def stats(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> SessionStats:
        with self._lock:
            sess = self._require(session_id, namespace)
            latest = sess.turns[sess.info.turn]
            records = self._records_upto(sess, sess.info.turn)
            return SessionStats(
                info=sess.info,
                turns=len(sess.turns),
                written_messages=len(records),
                written_tokens=sum(r.tokens for r in records),
                window_messages=len(latest.window),
                state_bytes=sum(len(b.data) for b in latest.state),
                stored_bytes=sum(len(b.data) for s in sess.turns.values() for b in s.state),
            )

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> InMemorySessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
