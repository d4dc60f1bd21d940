"""Round-trip latency of one session state through the store (``deltamem bench store``).

One round trip = ``commit`` of a full state (what the engine does after a turn) + ``load`` of it (what the next
turn does first), on the real store: a SQLite file and, when a URL is given, a PostgreSQL server. The state has
the embedded model's shape by default (30 layers × (1, 1, 8, 8) float32 = 7.5 KiB) plus a short window.
No torch needed: the store only sees bytes, dtype and shape.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from dataclasses import dataclass

from ..store import WindowMessage, WrittenMessage, open_store
from ..store.base import TensorBlob


@dataclass
class StoreLatency:
    backend: str
    url: str
    rounds: int
    state_bytes: int
    median_ms: float
    p99_ms: float
    commit_median_ms: float
    load_median_ms: float


def _state(layers: int, num_states: int, rank: int) -> list[TensorBlob]:
    shape = (1, num_states, rank, rank)
    size = 4 * num_states * rank * rank
    return [TensorBlob(f"memory.{i}", "float32", shape, os.urandom(size)) for i in range(layers)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def measure_store(url: str | None, *, rounds: int = 200, layers: int = 30, num_states: int = 1, rank: int = 8,
                  warmup: int = 10) -> StoreLatency:
    store = open_store(url)
    sid, ns = f"bench-{uuid.uuid4().hex[:12]}", "bench"
    try:
        info = store.create(sid, namespace=ns, model_fingerprint="bench", adapter_fingerprint="bench")
        window = [WindowMessage(0, "user", "hello " * 50, 60), WindowMessage(1, "assistant", "hi " * 20, 25)]
        totals, commits, loads = [], [], []
        version = info.version
        for i in range(warmup + rounds):
            blobs = _state(layers, num_states, rank)
            t0 = time.perf_counter()
            info = store.commit(sid, namespace=ns, expected_version=version, state=blobs,
                                written=[WrittenMessage(i, "user", uuid.uuid4().hex, 60)], window=window)
            t1 = time.perf_counter()
            data = store.load(sid, namespace=ns)
            t2 = time.perf_counter()
            version = info.version
            assert data.state[0].data == blobs[0].data
            if i >= warmup:
                totals.append((t2 - t0) * 1e3)
                commits.append((t1 - t0) * 1e3)
                loads.append((t2 - t1) * 1e3)
        backend = "postgresql" if url and url.startswith("postgres") else "sqlite"
        return StoreLatency(backend, str(getattr(store, "url", url)), rounds, layers * 4 * num_states * rank * rank,
                            statistics.median(totals), _percentile(totals, 0.99), statistics.median(commits),
                            statistics.median(loads))
    finally:
        try:
            store.delete(sid, namespace=ns)
        finally:
            store.close()


def format_table(results: list[StoreLatency]) -> str:
    lines = ["| backend | state bytes | rounds | round trip median (ms) | p99 (ms) | commit median | load median |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.backend} | {r.state_bytes} | {r.rounds} | {r.median_ms:.2f} | {r.p99_ms:.2f} | "
                     f"{r.commit_median_ms:.2f} | {r.load_median_ms:.2f} |")
    return "\n".join(lines)
