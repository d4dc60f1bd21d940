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

__all__ = [
    "LoadByLength",
    "StoreLatency",
    "format_length_table",
    "format_table",
    "main",
    "measure_load_by_length",
    "measure_store",
]


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


# ---------------------------------------------------------------------------------------------- load vs length
@dataclass
class LoadByLength:
    """How long ``load`` of the latest turn takes once a session has ``turns`` turns (one written record each).

    ``full_record_ms`` is the load that also reads the whole written record (``load(..., full_record=True)``),
    ``None`` on a store without that option.
    """

    backend: str
    turns: int
    repeats: int
    load_ms: float
    full_record_ms: float | None


def _timed_loads(store, sid: str, ns: str, repeats: int, **kw) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store.load(sid, namespace=ns, **kw)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_load_by_length(url: str | None, *, lengths: tuple[int, ...] = (10, 1000, 5000), repeats: int = 50,
                           layers: int = 30, num_states: int = 1, rank: int = 8) -> list[LoadByLength]:
    """Grow one session turn by turn (real commits: one written record and a two-message window per turn) and
    time ``repeats`` loads of its latest turn when it reaches each of ``lengths``."""
    import inspect

    store = open_store(url)
    sid, ns = f"bench-len-{uuid.uuid4().hex[:12]}", "bench"
    backend = "postgresql" if url and url.startswith("postgres") else "sqlite"
    has_full = "full_record" in inspect.signature(store.load).parameters
    results = []
    try:
        info = store.create(sid, namespace=ns, model_fingerprint="bench", adapter_fingerprint="bench")
        blobs = _state(layers, num_states, rank)
        for target in sorted(lengths):
            while info.turn < target:
                i = info.turn
                window = [WindowMessage(i, "user", "hello " * 50, 60)]
                info = store.commit(sid, namespace=ns, expected_version=info.version, state=blobs,
                                    written=[WrittenMessage(i, "user", uuid.uuid4().hex, 60)], window=window)
            _timed_loads(store, sid, ns, 5)  # warm-up: caches, pool
            load_ms = _timed_loads(store, sid, ns, repeats)
            full_ms = _timed_loads(store, sid, ns, repeats, full_record=True) if has_full else None
            results.append(LoadByLength(backend, target, repeats, load_ms, full_ms))
    finally:
        try:
            store.delete(sid, namespace=ns)
        finally:
            store.close()
    return results


def format_length_table(results: list[LoadByLength]) -> str:
    lines = ["| backend | turns | load median (ms) | load with full record (ms) |", "|---|---:|---:|---:|"]
    for r in results:
        full = "—" if r.full_record_ms is None else f"{r.full_record_ms:.2f}"
        lines.append(f"| {r.backend} | {r.turns} | {r.load_ms:.2f} | {full} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m deltamem_agents.benchmarks.store_latency --by-length [--url URL]…``"""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", default=None,
                        help="store URL (repeatable; default: a temporary SQLite file, plus "
                             "$DELTAMEM_TEST_POSTGRES_URL)")
    parser.add_argument("--by-length", action="store_true",
                        help="time load of the latest turn at several session lengths instead of the round trip")
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    urls = args.url
    if not urls:
        urls = [f"sqlite:///{tempfile.mkdtemp(prefix='deltamem-bench-')}/sessions.db"]
        if os.environ.get("DELTAMEM_TEST_POSTGRES_URL"):
            urls.append(os.environ["DELTAMEM_TEST_POSTGRES_URL"])
    if args.by_length:
        rows = [r for u in urls for r in measure_load_by_length(u, lengths=tuple(args.lengths),
                                                                repeats=args.repeats)]
        print(format_length_table(rows))
    else:
        print(format_table([measure_store(u, rounds=args.rounds) for u in urls]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
