"""`DecodeBatcher`: runs the decode steps of every generating session as one batched forward (continuous batching).

Who does what:

* The **session's thread** (inside :func:`~.generation.generate`) runs its prefill alone, picks its first token,
  then hands its KV cache, state and :class:`~.token_decoder.TokenDecoder` to :meth:`DecodeBatcher.decode` and
  reads its events from a queue.
* The **decode thread** (one per batcher, started when the first session arrives, gone when none is left) owns
  a :class:`~.decode_group.DecodeGroup`. Each round it drops sessions that left, merges newly arrived ones, runs
  one forward for all rows, and lets each row's decoder sample, detect EOS / stop strings / the length limit /
  cancellation, and queue its event. A finished row's cache is split back into the session's own cache
  *before* its last event is queued, so when ``generate`` returns, the cache holds exactly what the alone path
  would leave (the prompt bitwise, the generated tokens' KV within tolerance) and the turn can crop, commit and
  keep it hot.

Sampling happens in the decode thread, as in vLLM or TGI: a session whose consumer is slow (a slow HTTP client)
never holds back the others — its events wait in its queue. A session that stops early (its consumer closed the
stream), is cancelled, or fails in its own decoder leaves the group between two steps; the other rows go on
untouched. A failing batched forward fails every row of that step (their turns raise and commit nothing).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapter import DeltaMemState
from .decode_group import DecodeGroup, GroupRow, cache_layout

if TYPE_CHECKING:
    from .batching import ModelRunner
    from .token_decoder import GenerationEvent, TokenDecoder

__all__ = ["BatchStats", "DecodeBatcher"]

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """Counters since the batcher was made: ``steps`` (batched forwards), ``row_steps`` (tokens they ran: the
    mean batch is ``row_steps / steps``), ``joined``/``left`` sessions, ``max_rows`` seen in one step."""

    steps: int = 0
    row_steps: int = 0
    joined: int = 0
    left: int = 0
    max_rows: int = 0

    @property
    def mean_rows(self) -> float:
        return self.row_steps / self.steps if self.steps else 0.0


@dataclass(eq=False)
class _Member:
    """A session inside the batcher: its decoder, the next token to run, and its event queue."""

    decoder: TokenDecoder
    row: GroupRow
    token: int
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    abandoned: threading.Event = field(default_factory=threading.Event)  # the session stopped listening
    left: threading.Event = field(default_factory=threading.Event)  # the decode thread is done with it


class DecodeBatcher:
    """Batches the decode steps of concurrent sessions (see the module docstring).

    Args:
        runner: the model runner (its lock still serialises every forward call, prefills and writes included).
        max_rows: most sessions in one batched step; later ones wait for a free row (their first token is
            already streamed).
    """

    def __init__(self, runner: ModelRunner, max_rows: int = 16) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        self.runner = runner
        self.max_rows = max_rows
        self.stats = BatchStats()
        self._lock = threading.RLock()  # arrivals, the session count, the thread handle
        self._arriving: list[_Member] = []
        self._sessions = 0
        self._thread: threading.Thread | None = None

    @property
    def sessions(self) -> int:
        """Sessions in the batcher now: in the group, or arrived and waiting for a row."""
        with self._lock:
            return self._sessions

    @staticmethod
    def accepts(cache: Any) -> bool:
        """Whether a session with this cache can join (a filled ``DynamicCache`` of full or sliding-window
        layers); otherwise it decodes alone."""
        return cache_layout(cache) is not None

    def decode(self, decoder: TokenDecoder, state: DeltaMemState, cache: Any, token: int) -> Iterator[GenerationEvent]:
        """Continue a generation in the batch: run ``token`` (the first generated one) and every next one.

        Called in the session's thread after its prefill. Yields the session's events, the last one with
        ``finish_reason``; by then ``cache`` holds the prompt and every generated token that was run. Closing
        the iterator early takes the session out of the batch (and waits until it is out).
        """
        member = _Member(decoder, GroupRow(cache, state), token)
        member.row.owner = member
        with self._lock:
            self._arriving.append(member)
            self._sessions += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deltamem-decode", daemon=True)
                self._thread.start()
        try:
            while True:
                item = member.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not member.left.is_set():
                member.abandoned.set()  # taken out between two steps; the others go on
                member.left.wait()

    # -- the decode thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        group = DecodeGroup(self.runner)
        try:
            while True:
                with self._lock:
                    for member in [m for m in self._arriving if m.abandoned.is_set()]:
                        self._arriving.remove(member)  # stopped listening while it waited for a row
                        self._out(member)
                    if not self._arriving and not group.rows:
                        self._thread = None  # a later decode() starts a new thread
                        return
                    room = self.max_rows - len(group)
                    arriving, self._arriving = self._arriving[:room], self._arriving[room:]
                gone = [r for r in group.rows if r.owner.abandoned.is_set()]
                if gone:
                    group.remove(gone)
                    for row in gone:
                        self._out(row.owner)
                self._join(group, arriving)
                if group.rows:
                    self._step(group)
        except BaseException as exc:  # a bug here must not leave sessions waiting forever
            logger.exception("decode thread failed")
            with self._lock:
                orphans, self._arriving, self._thread = self._arriving, [], None
            for member in [r.owner for r in group.rows] + orphans:
                if not member.left.is_set():
                    self._out(member, exc)
            group.clear()

    def _out(self, member: _Member, item: Any = None) -> None:
        """The member is out of the batcher; ``item``: its last event, or the exception it fails with."""
        with self._lock:
            self._sessions -= 1
            self.stats.left += 1
        member.left.set()
        if item is not None:
            member.events.put(item)

    def _join(self, group: DecodeGroup, arriving: list[_Member]) -> None:
        if not arriving:
            return
        try:
            group.add([m.row for m in arriving])
        except Exception as exc:  # e.g. out of memory while merging: those sessions fail, the group is unchanged
            for member in arriving:
                self._out(member, exc)
            return
        self.stats.joined += len(arriving)

    def _step(self, group: DecodeGroup) -> None:
        rows = list(group.rows)
        try:
            logits = group.step([r.owner.token for r in rows])
        except Exception as exc:  # the forward failed: every row of it fails, their caches are of no use
            group.clear()
            for row in rows:
                self._out(row.owner, exc)
            return
        self.stats.steps += 1
        self.stats.row_steps += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        finished: list[tuple[GroupRow, Any]] = []
        for i, row in enumerate(rows):
            member: _Member = row.owner
            try:
                event, token = member.decoder.step(logits[i])
            except Exception as exc:  # this session's own failure (sampling, detokenising): only it stops
                finished.append((row, exc))
                continue
            if token is None:
                finished.append((row, event))
                continue
            member.token = token
            if event is not None:
                member.events.put(event)
        if finished:
            # Split the finished rows' caches back before their last event: the session goes on with its turn
            # (crop, commit, keep the cache hot) as soon as it reads that event.
            group.remove([row for row, _ in finished])
            for row, item in finished:
                self._out(row.owner, item)
