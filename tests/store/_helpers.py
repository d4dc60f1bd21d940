"""Helpers shared by the store tests (data builders and direct-SQL probes)."""

from __future__ import annotations

import random

from sqlalchemy import text

from deltamem_agents.store import TensorBlob, WindowMessage, WrittenMessage

TABLES = ("sessions", "snapshots", "state_tensors", "written_messages", "window_messages")


def blob(name: str = "layer0", dtype: str = "float32", shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> TensorBlob:
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4}[dtype]
    n = itemsize
    for d in shape:
        n *= d
    return TensorBlob(name=name, dtype=dtype, shape=shape, data=random.Random(seed).randbytes(n))


def written(*indexes: int, tag: str = "") -> list[WrittenMessage]:
    """Records of these history indexes; ``tag`` varies the digests (another message at the same position)."""
    return [WrittenMessage(index=i, role="user", digest=f"{tag}{i:064x}"[-64:], tokens=10 + i) for i in indexes]


def window(*indexes: int) -> list[WindowMessage]:
    return [WindowMessage(index=i, role="assistant", content=f"message {i} — ünïcode", tokens=5) for i in indexes]


def new_session(store, ns: str, sid: str = "s1", **kw):
    return store.create(sid, namespace=ns, model_fingerprint="model-fp", adapter_fingerprint="adapter-fp", **kw)


def commit_turns(store, ns: str, sid: str, n: int, tag: str = ""):
    """Commit ``n`` turns, each writing the next message of the record (digests varied by ``tag``), a state
    seeded by the turn number and a one-message window."""
    data = store.load(sid, namespace=ns)
    info, count = data.info, data.record.count
    for _ in range(n):
        k = info.turn + 1
        info = store.commit(
            sid, namespace=ns, expected_version=info.version, state=[blob(seed=k), blob("layer1", seed=-k)],
            written=written(count, tag=tag), window=window(k - 1),
        )
        count += 1
    return info


def indexes(store, ns: str, sid: str, **kw) -> list[int]:
    """The indexes of the full written record (``load(..., full_record=True)``)."""
    return [w.index for w in store.load(sid, namespace=ns, full_record=True, **kw).written]


def session_pk(engine, ns: str, sid: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT id FROM sessions WHERE namespace = :ns AND session_id = :sid"), {"ns": ns, "sid": sid}
        ).scalar()


def row_counts(engine, pk: int) -> dict[str, int]:
    """Rows each table holds for session ``pk``, by direct SQL."""
    with engine.connect() as conn:
        counts = {"sessions": conn.execute(text("SELECT count(*) FROM sessions WHERE id = :pk"), {"pk": pk}).scalar()}
        for table in TABLES[1:]:
            counts[table] = conn.execute(
                text(f"SELECT count(*) FROM {table} WHERE session_pk = :pk"), {"pk": pk}
            ).scalar()
    return counts


def snapshot_of(store, ns: str, sid: str):
    """Everything observable about a session, to show that a failed call changed nothing."""
    return (store.get(sid, namespace=ns), store.load(sid, namespace=ns), store.list_turns(sid, namespace=ns))
