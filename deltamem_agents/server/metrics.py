"""Prometheus metrics of one app (its own registry, so several apps in one process never collide).

Counted as requests happen: requests by route template / method / status, latency and time to first token,
tokens (prompt, completion, cached). Read from the engine at scrape time: KV cache counters and sizes
(``engine.kv_cache_stats()``), batched decode (``engine.batch_stats()``, with ``--batch-decode``), stored sessions,
admitted and running requests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics", "count_sessions"]

logger = logging.getLogger("deltamem_agents.server")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def count_sessions(store: Any) -> int:
    """Sessions in the store, all namespaces: one ``COUNT`` on an SQL store, a listing otherwise."""
    sql_engine = getattr(store, "engine", None)
    if sql_engine is not None and hasattr(sql_engine, "connect"):
        from sqlalchemy import func, select

        from ..store.schema import SessionRow

        with sql_engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(SessionRow.__table__)).scalar_one())
    return len(store.list_sessions(namespace=None, limit=1_000_000))


class _EngineCollector(Collector):
    """Values read when Prometheus scrapes: they live in the engine, the store and the limiter."""

    def __init__(self, engine: Any, limiter: Any) -> None:
        self._engine = engine
        self._limiter = limiter

    def describe(self) -> list[Metric]:
        return []  # collected lazily: do not touch the engine at registration

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.kv_cache_stats()
        for name, value, text in (
            ("hits", stats.hits, "turns that continued a hot KV cache"),
            ("disk_hits", stats.disk_hits, "turns that resumed a KV cache saved on disk"),
            ("misses", stats.misses, "turns that re-prefilled their context from text"),
            ("slides", stats.slides, "times the KV budget filled and older messages left the cache"),
            ("evictions", stats.evictions, "hot KV caches pushed out of memory"),
        ):
            yield CounterMetricFamily(f"deltamem_kv_cache_{name}", text, value=value)
        yield GaugeMetricFamily("deltamem_kv_cache_sessions", "sessions with a hot KV cache", value=stats.sessions)
        yield GaugeMetricFamily("deltamem_kv_cache_bytes", "bytes of hot KV caches", value=stats.bytes)
        try:
            sessions = count_sessions(self._engine.store)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is busy
            logger.warning("metrics: could not count sessions: %s", exc)
        else:
            yield GaugeMetricFamily("deltamem_sessions", "sessions in the store (all namespaces)", value=sessions)
        batch = self._engine.batch_stats() if hasattr(self._engine, "batch_stats") else None
        if batch is not None:  # only with --batch-decode
            for name, value, text in (
                ("steps", batch.steps, "batched decode forwards (one per step of all generating sessions)"),
                ("row_steps", batch.row_steps, "tokens decoded by batched forwards (mean batch: row_steps / steps)"),
                ("joined", batch.joined, "sessions that joined the decode batch"),
            ):
                yield CounterMetricFamily(f"deltamem_batch_{name}", text, value=value)
            yield GaugeMetricFamily("deltamem_batch_max_rows", "most sessions decoded in one batched forward",
                                    value=batch.max_rows)
        yield GaugeMetricFamily("deltamem_requests_admitted", "model requests running or waiting",
                                value=self._limiter.admitted)
        yield GaugeMetricFamily("deltamem_requests_running", "model requests running in the engine",
                                value=self._limiter.running)


class ServerMetrics:
    """The app's metrics; ``render()`` is the ``/metrics`` body."""

    def __init__(self, engine: Any, limiter: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("deltamem_requests", "HTTP requests by route, method and status",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("deltamem_request_duration_seconds", "time from request to the end of the "
                                 "response, by route", ("route",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("deltamem_time_to_first_token_seconds", "streaming: time from request to "
                                     "the first content", ("route",), buckets=_LATENCY_BUCKETS,
                                     registry=self.registry)
        self.tokens = Counter("deltamem_tokens", "tokens of generation requests: prompt, completion, cached "
                              "(prompt tokens reused from the KV cache)", ("kind",), registry=self.registry)
        self.registry.register(_EngineCollector(engine, limiter))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_usage(self, usage: Any) -> None:
        self.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.tokens.labels("completion").inc(usage.completion_tokens)
        self.tokens.labels("cached").inc(usage.cached_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

