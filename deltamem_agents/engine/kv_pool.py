"""Hot KV caches of sessions between turns: the short-term memory of ``online`` mode.

A session's :class:`HotContext` is the transformers KV cache of the conversation as the model last saw it (the
template head, then the messages it kept, in order), together with what it belongs to: the session version it
was committed with, a digest of the state committed with it, and the history indices and digests of its
messages. The next turn of that session continues it and runs only its new tokens.

:class:`KVCachePool` keeps contexts in an LRU bounded in **bytes** (a KV cache is ~46 KB per token for the
embedded model: 8k tokens ≈ 377 MB). A turn *takes* its session's context out of the pool and puts the extended
one back only after its commit succeeded, so a failed, cancelled or conflicting turn can never leave a cache
that disagrees with the stored session behind. Evicted contexts go to the optional on-disk store
(:mod:`.kv_files`) so that a later turn, or another process after a restart, skips the re-prefill.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..models.kv_cache import cache_layers, cache_length
from ..store.base import SessionData, TensorBlob

__all__ = ["HotContext", "KVCachePool", "KVCacheStats", "state_digest"]


def state_digest(blobs: Sequence[TensorBlob]) -> str:
    """Hex SHA-256 over a state's tensors (names, dtypes, shapes and bytes); ``[]`` (the zero state) has its own."""
    h = hashlib.sha256(b"deltamem-state-v1")
    for blob in blobs:
        h.update(f"|{blob.name}|{blob.dtype}|{','.join(map(str, blob.shape))}|{len(blob.data)}|".encode())
        h.update(blob.data)
    return h.hexdigest()


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a KV cache's tensors."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache_layers(cache))


@dataclass
class HotContext:
    """A session's KV cache as of one committed version.

    Attributes:
        cache: the ``DynamicCache``: ``head_tokens`` of template head (a default system prompt, BOS, a pinned
            system message…), then the messages ``indices`` in order, each as ``message_ids`` renders it.
        version: the session version the cache was committed with.
        state: :func:`state_digest` of the state committed with it.
        indices, digests: the history indices and message digests of the messages in the cache (after the head).
        head_tokens: tokens before the first message of ``indices``.
        tools: digest of the tool definitions the head was rendered with (``""``: none).
        record: the written record's history chain (``RecordSummary.history_digest``) as committed with it.
    """

    cache: Any
    version: int
    state: str
    indices: tuple[int, ...]
    digests: tuple[str, ...]
    head_tokens: int
    tools: str = ""
    record: str = ""

    @property
    def tokens(self) -> int:
        return cache_length(self.cache)

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self.cache)

    def belongs_to(self, data: SessionData) -> bool:
        """True when this cache is the one of ``data`` (the session's latest turn as loaded): same version, same
        state bytes, and its messages are the last messages of the written record."""
        if data.turn != data.info.turn or self.version != data.info.version:
            return False
        if self.state != state_digest(data.state):
            return False
        # The chain of every written digest at this cache's commit: equal chains mean the same written record,
        # so its messages are the record's last ones (no read of the record needed).
        if self.record != data.record.history_digest:
            return False
        if not self.indices:
            return data.record.count == 0
        return self.indices[-1] == data.record.count - 1


@dataclass
class KVCacheStats:
    """Counters of a pool since the engine started (``hits``: a turn continued a hot cache; ``disk_hits``: one
    loaded from disk; ``misses``: a turn re-prefilled its context from text; ``slides``: the context window
    filled and older messages left the cache in a block, followed by one re-prefill)."""

    hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    slides: int = 0
    evictions: int = 0
    sessions: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    reprefilled_tokens: int = 0


class KVCachePool:
    """An LRU of :class:`HotContext` keyed by ``(namespace, session_id)``, bounded in bytes (thread-safe).

    Args:
        max_bytes: total bytes of KV tensors kept; ``0`` keeps nothing (every turn re-prefills).
        on_evict: called with ``(key, context)`` for each context pushed out (e.g. to save it to disk).
    """

    def __init__(self, max_bytes: int, on_evict: Callable[[tuple[str, str], HotContext], None] | None = None) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._entries: OrderedDict[tuple[str, str], tuple[HotContext, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = KVCacheStats(capacity_bytes=max_bytes)

    def take(self, key: tuple[str, str]) -> HotContext | None:
        """Remove and return the session's context (None if absent): the caller owns it until :meth:`put`."""
        with self._lock:
            item = self._entries.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            self._update_sizes()
            return item[0]

    def put(self, key: tuple[str, str], context: HotContext) -> None:
        """Keep ``context`` as the session's (most recently used); evict the least recently used over budget."""
        size = context.nbytes
        evicted: list[tuple[tuple[str, str], HotContext]] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                evicted.append((key, context))
            else:
                self._entries[key] = (context, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    k, (ctx, n) = self._entries.popitem(last=False)
                    self._bytes -= n
                    evicted.append((k, ctx))
            self.stats.evictions += len(evicted)
            self._update_sizes()
        for k, ctx in evicted:
            if self._on_evict is not None:
                self._on_evict(k, ctx)

    def discard(self, key: tuple[str, str]) -> None:
        """Forget the session's context (after a rollback, reset or delete)."""
        self.take(key)

    def drain(self) -> list[tuple[tuple[str, str], HotContext]]:
        """Remove and return every context (oldest first), e.g. to save them when the engine closes."""
        with self._lock:
            items = [(k, ctx) for k, (ctx, _) in self._entries.items()]
            self._entries.clear()
            self._bytes = 0
            self._update_sizes()
        return items

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def _update_sizes(self) -> None:
        self.stats.sessions = len(self._entries)
        self.stats.bytes = self._bytes
