"""Measuring an arm's cost: wall time and peak memory.

Peak memory is the peak resident set size (RSS) of this process *while the arm runs*, sampled every 10 ms from
``/proc/self/statm`` by a background thread (falling back to ``resource.getrusage`` ``ru_maxrss``, a lifetime
peak, where ``/proc`` does not exist). ``tracemalloc`` is not used: it sees only Python's allocator, not the
tensors PyTorch allocates. Before each arm the garbage collector runs and glibc is asked to return free heap
pages to the OS (``malloc_trim``), so an arm's peak is not inflated by memory an earlier arm freed but the
allocator kept. On CUDA the peak allocated device memory (``torch.cuda.max_memory_allocated``) is reported too.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["ResourceMonitor", "ResourceUsage", "current_rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int | None:
    """Resident set size now, from ``/proc/self/statm`` (``None`` where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _lifetime_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kilobytes on Linux, bytes on macOS


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc only; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class ResourceUsage:
    """What one arm cost. Memory in MiB; ``method`` says how the peak was measured."""

    wall_s: float
    rss_start_mib: float
    peak_rss_mib: float
    method: str
    peak_cuda_mib: float | None = None


class ResourceMonitor:
    """Context manager measuring wall time and peak RSS (and CUDA memory) of the block it wraps."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.usage: ResourceUsage | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = current_rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> ResourceMonitor:
        release_free_memory()
        self._cuda = _cuda_reset()
        start = current_rss_bytes()
        self._proc = start is not None
        self._start = start if start is not None else _lifetime_peak_bytes()
        self._peak = self._start
        if self._proc:
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end = current_rss_bytes()
        peak = max(self._peak, end or 0) if self._proc else _lifetime_peak_bytes()
        method = "sampled /proc/self/statm RSS every 10 ms" if self._proc else "getrusage ru_maxrss (lifetime peak)"
        mib = 1024 * 1024
        self.usage = ResourceUsage(wall, self._start / mib, peak / mib, method, _cuda_peak() if self._cuda else None)


def _cuda_reset() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return True
    except Exception:  # CUDA probing must never break an evaluation
        pass
    return False


def _cuda_peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / (1024 * 1024)
