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


def written(*indexes: int) -> list[WrittenMessage]:
    return [WrittenMessage(index=i, role="user", digest=f"{i:064x}", tokens=10 + i) for i in indexes]


def window(*indexes: int) -> list[WindowMessage]:
    return [WindowMessage(index=i, role="assistant", content=f"message {i} — ünïcode", tokens=5) for i in indexes]


def new_session(store, ns: str, sid: str = "s1", **kw):
    return store.create(sid, namespace=ns, model_fingerprint="model-fp", adapter_fingerprint="adapter-fp", **kw)


def commit_turns(store, ns: str, sid: str, n: int, start_index: int = 0):
    """Commit ``n`` turns, turn k writing message ``start_index + k - 1`` and a state seeded by k."""
    info = store.get(sid, namespace=ns)
    for _ in range(n):
        k = info.turn + 1
        info = store.commit(
            sid, namespace=ns, expected_version=info.version, state=[blob(seed=k), blob("layer1", seed=-k)],
            written=written(start_index + k - 1), window=window(k - 1),
        )
    return info


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
