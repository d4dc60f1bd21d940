"""Admission control: a bounded number of model requests in the server, running plus waiting.

A request that finds ``max_queue`` others admitted is refused at once with 503 and ``Retry-After`` rather than
queued without bound (a queue nobody bounds turns overload into timeouts for everyone). Admitted requests take
one of ``max_concurrency`` slots to run in the engine, in arrival order. Serialising the requests of one
session is the engine's job (its per-session lock and the store's versions), not this module's.
"""

from __future__ import annotations

import asyncio
import threading

from .errors import APIError

__all__ = ["AdmissionLimiter", "Ticket"]


class Ticket:
    """One admitted request: :meth:`start` waits for a run slot, :meth:`release` (idempotent) frees both."""

    def __init__(self, limiter: AdmissionLimiter) -> None:
        self._limiter = limiter
        self._running = False
        self._released = False

    async def start(self) -> None:
        await self._limiter._semaphore().acquire()
        self._running = True
        self._limiter._started()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self._running)


class AdmissionLimiter:
    """At most ``max_queue`` admitted requests, at most ``max_concurrency`` of them running.

    The admitted count is guarded by a thread lock (the metrics scrape and tests read it from other threads);
    the run slots are an :class:`asyncio.Semaphore` of the server's event loop, created on first use.
    """

    def __init__(self, max_queue: int, max_concurrency: int, retry_after_s: int = 1) -> None:
        if max_queue < 1 or max_concurrency < 1:
            raise ValueError("max_queue and max_concurrency must be >= 1")
        self.max_queue = max_queue
        self.max_concurrency = min(max_concurrency, max_queue)
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._sem: asyncio.Semaphore | None = None

    @property
    def admitted(self) -> int:
        """Requests in the server now (running and waiting)."""
        return self._admitted

    @property
    def running(self) -> int:
        return self._running

    def admit(self) -> Ticket:
        """A ticket, or 503 when ``max_queue`` requests are already admitted."""
        with self._lock:
            if self._admitted >= self.max_queue:
                raise APIError(
                    503, f"the server is overloaded ({self.max_queue} requests in progress or waiting); "
                    "retry shortly", code="overloaded", headers={"Retry-After": str(self.retry_after_s)},
                )  # fmt: skip
            self._admitted += 1
        return Ticket(self)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._sem

    def _started(self) -> None:
        with self._lock:
            self._running += 1

    def _release(self, running: bool) -> None:
        with self._lock:
            self._admitted -= 1
            if running:
                self._running -= 1
        if running and self._sem is not None:
            self._sem.release()
