"""How each mode runs a turn: what the prompt holds, how messages are written, what is kept between turns.

Every mode has the same small interface (:class:`TurnMode`); the engine calls, for one session under its lock:

``begin`` → ``prompt`` → (generation) → ``write_reply`` → ``window`` → commit → ``committed``

(``write()`` calls ``begin`` → ``write_new`` → ``window`` → commit → ``committed``; a turn that fails or is
cancelled calls ``abandon`` instead of ``committed``). The modes:

* :class:`OnlineTurns` (``online``, the default): short-term memory is the KV cache, long-term memory the state.
  The prompt is the conversation as far as the KV budget allows; each message is written into the state as it
  passes, continuing that KV cache, and the reply likewise after generation. The session's KV cache stays hot
  between turns (:mod:`.kv_pool`), so a turn runs only its new tokens. When the budget fills, the oldest
  messages leave in a block (they are already in the state) and the rest is re-prefilled once.
* :class:`WindowedTurns` (``windowed``): the prompt is the pinned system message, the recent window as text and
  the current turn; each message is written **on its own** (no text context), so the state is a pure fold over
  the messages.
* :class:`StateOnlyTurns` (``state-only``): as windowed, with only the current turn as text.
* :class:`AuthorsTurns` (``online`` under ``MemoryEngine(protocol="authors")``, an option): the authors' chat
  protocol, which also writes the generation header and each generated token as they run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..adapter import DeltaMemState
from ..models.kv_cache import CacheMark, cache_length, cache_mark, cache_rewind
from ..store.base import SessionData, SessionInfo, TensorBlob, WindowMessage, WrittenMessage
from ..store.digests import extend_history
from .batching import ModelRunner
from .errors import ContextLengthError
from .kv_files import KVCacheFiles
from .kv_pool import HotContext, KVCachePool, state_digest
from .rendering import ChatRenderer
from .sampling import SamplingParams
from .session import TurnPlan
from .token_decoder import GenerationEvent
from .window import HistoryItem, pinned_system, select_window

__all__ = [
    "AuthorsTurns",
    "GenOptions",
    "OnlineTurns",
    "Prepared",
    "Prompt",
    "StateOnlyTurns",
    "TurnMode",
    "TurnWork",
    "WindowedTurns",
]

logger = logging.getLogger(__name__)

#: Tokens kept free beyond what a turn is known to need (template tokens around a re-rendered reply).
_MARGIN = 16


@dataclass(frozen=True)
class GenOptions:
    max_new_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    tools: Any


@dataclass
class Prepared:
    """A loaded session and the plan of a call; ``state`` is the state at ``plan.base_turn``."""

    data: SessionData
    plan: TurnPlan
    state: DeltaMemState


@dataclass
class Prompt:
    """What generation starts from: ``cache`` holds the prompt before ``tail``; every position reads
    ``read_state``. ``prompt_tokens`` = the whole prompt's length, ``cached_tokens`` = how much of it was
    reused from a previous turn's cache (not run again)."""

    cache: Any
    read_state: DeltaMemState
    tail: list[int]
    prompt_tokens: int
    cached_tokens: int
    writes: bool = False
    segment_ids: list[int] | None = None
    reply_segment: int | None = None


@dataclass
class TurnWork:
    """One call on one session while its mode runs it.

    ``state`` is the state after what this call has written so far, ``written`` those records. Online mode
    adds the KV ``context`` it extends, how it got it (``kv``: ``"hot"``, ``"disk"``, ``"rebuilt"``,
    ``"slid"``, ``"new"``) and ``reused`` (tokens of it a previous turn had already run). The authors' protocol
    (:class:`AuthorsTurns`) adds ``pending_head`` (a template head not run yet: it is written with the first
    message) and where the turn started: ``turn_at`` (cache length) and ``turn_head`` (the head this turn ran).
    """

    key: tuple[str, str]
    prep: Prepared
    state: DeltaMemState
    written: list[WrittenMessage] = field(default_factory=list)
    context: HotContext | None = None
    kv: str | None = None
    reused: int = 0
    header_at: int = 0
    mark: CacheMark | None = None
    tools: Any = None
    pending_head: list[int] = field(default_factory=list)
    turn_at: int = 0
    turn_head: list[int] = field(default_factory=list)


class TurnMode:
    """The interface of a mode (see the module docstring). Subclasses set :attr:`name`."""

    name: ClassVar[str]

    def __init__(self, runner: ModelRunner, renderer: ChatRenderer, context_window: int) -> None:
        self.runner = runner
        self.renderer = renderer
        self.context_window = context_window

    def begin(self, key: tuple[str, str], prep: Prepared, gen: GenOptions | None) -> TurnWork:
        return TurnWork(key, prep, prep.state)

    def prompt(self, work: TurnWork, gen: GenOptions) -> Prompt:
        raise NotImplementedError

    def write_new(self, work: TurnWork) -> None:
        """Write the plan's new messages (``write()``; and a turn written again after a concurrent update)."""
        raise NotImplementedError

    def write_reply(self, work: TurnWork, prompt: Prompt, reply: HistoryItem,
                    generated: GenerationEvent | None = None) -> None:
        """Write the new messages not written yet and the reply (``generated``: the generation's last event)."""
        raise NotImplementedError

    def window(self, work: TurnWork, items: Sequence[HistoryItem]) -> list[WindowMessage]:
        """The messages the store keeps as text after this call (``items``: the history incl. the reply)."""
        raise NotImplementedError

    def committed(self, work: TurnWork, info: SessionInfo, blobs: list[TensorBlob]) -> None:
        """The call's commit succeeded with ``info`` and state ``blobs``."""

    def abandon(self, work: TurnWork) -> None:
        """The call failed, was cancelled or lost a race: drop whatever it holds."""

    def forget(self, key: tuple[str, str]) -> None:
        """The session's current state changed outside a turn (rollback, reset, delete, import)."""

    # -- shared -------------------------------------------------------------------------------------------
    def _record(self, item: HistoryItem, n: int) -> WrittenMessage:
        return WrittenMessage(item.index, item.message.role, item.message.digest, n)


def _window_messages(items: Sequence[HistoryItem]) -> list[WindowMessage]:
    return [WindowMessage(i.index, i.message.role, i.message.content, i.tokens) for i in items]


# ---------------------------------------------------------------------------------------------- text window
class WindowedTurns(TurnMode):
    """``windowed``: recent window as text; each message written on its own, after generation."""

    name = "windowed"

    def __init__(self, runner: ModelRunner, renderer: ChatRenderer, context_window: int, window_tokens: int) -> None:
        super().__init__(runner, renderer, context_window)
        self.window_tokens = window_tokens

    def _prompt_items(self, plan: TurnPlan) -> tuple[list[HistoryItem], int]:
        """The prompt's messages and how many trailing ones (the current turn) must stay."""
        history = plan.history
        last_assistant = max((p for p, h in enumerate(history) if h.message.role == "assistant"), default=-1)
        current = max(1, len(history) - 1 - last_assistant)
        return select_window(history, self.window_tokens, keep_last=current), current

    def prompt(self, work: TurnWork, gen: GenOptions) -> Prompt:
        items, forced = self._prompt_items(work.prep.plan)
        while True:
            ids = self.renderer.prompt_ids([i.message for i in items], tools=gen.tools)
            if len(ids) + gen.max_new_tokens <= self.context_window:
                break
            pinned = pinned_system(items)
            droppable = [i for i in items[: len(items) - forced] if i not in pinned]
            if not droppable:
                raise ContextLengthError(
                    f"the current turn needs {len(ids)} prompt tokens + max_new_tokens={gen.max_new_tokens}, more "
                    f"than the model's context window of {self.context_window}"
                )
            items.remove(droppable[0])
        # Generation reads the state as it was before this turn (writes off); the turn is written afterwards.
        return Prompt(self.runner.new_cache(), work.prep.state, ids, len(ids), 0)

    def _write_alone(self, work: TurnWork, items: Sequence[HistoryItem]) -> None:
        for item in items:
            ids = self.renderer.message_ids(item.message)
            _, work.state = self.runner.forward(work.state, ids, writes=True, segment_id=item.index, want_logits=False)
            work.written.append(self._record(item, len(ids)))

    def write_new(self, work: TurnWork) -> None:
        self._write_alone(work, work.prep.plan.new)

    def write_reply(self, work: TurnWork, prompt: Prompt, reply: HistoryItem,
                    generated: GenerationEvent | None = None) -> None:
        self._write_alone(work, [*work.prep.plan.new, reply])

    def window(self, work: TurnWork, items: Sequence[HistoryItem]) -> list[WindowMessage]:
        return _window_messages(select_window(items, self.window_tokens, keep_last=1))


class StateOnlyTurns(WindowedTurns):
    """``state-only``: only the pinned system message and the current turn as text."""

    name = "state-only"

    def _prompt_items(self, plan: TurnPlan) -> tuple[list[HistoryItem], int]:
        history = plan.history
        last_assistant = max((p for p, h in enumerate(history) if h.message.role == "assistant"), default=-1)
        current = max(1, len(history) - 1 - last_assistant)
        pinned = pinned_system(history)
        return pinned + [h for h in history[-current:] if h not in pinned], current


# ---------------------------------------------------------------------------------------------- online
def tools_digest(tools: Any) -> str:
    """What a cached head was rendered with: a turn with other tool definitions cannot reuse it."""
    if not tools:
        return ""
    return hashlib.sha256(json.dumps(tools, sort_keys=True, default=str).encode()).hexdigest()


class OnlineTurns(TurnMode):
    """``online``: the KV cache is short-term memory, the state long-term memory (see the module docstring).

    Args:
        kv_tokens: the KV budget: the prompt (cache + this turn + generation) stays within it when it can.
        retain: when the budget fills, keep the newest ``retain × kv_tokens`` tokens of messages (plus the
            pinned system message) and re-prefill them once; the rest of the budget is room for the next turns,
            so a re-prefill happens once per ``(1 − retain) × kv_tokens`` tokens of conversation, never per turn.
        pool: hot caches between turns (None: none kept); files: their on-disk copies (None: not persisted).
    """

    name = "online"

    def __init__(self, runner: ModelRunner, renderer: ChatRenderer, context_window: int, *, kv_tokens: int,
                 retain: float, pool: KVCachePool | None, files: KVCacheFiles | None, cache_config: Any) -> None:
        super().__init__(runner, renderer, context_window)
        self.kv_tokens = kv_tokens
        self.retain = retain
        self.pool = pool
        self.files = files
        self.cache_config = cache_config

    # -- obtaining the context ------------------------------------------------------------------------------
    def begin(self, key: tuple[str, str], prep: Prepared, gen: GenOptions | None) -> TurnWork:
        plan = prep.plan
        new_tokens = sum(i.tokens for i in plan.new)
        reserve = new_tokens + _MARGIN + (gen.max_new_tokens + len(self.renderer.generation_header_ids) if gen else 0)
        tools = tools_digest(gen.tools if gen else None)
        # The least any turn needs: the template head before the new messages, the new messages, generation.
        least = len(self.renderer.continuation_ids([], [i.message for i in plan.new], tools=gen.tools if gen else None))
        if least + reserve - _MARGIN > self.context_window:
            raise ContextLengthError(
                f"this turn needs {least + reserve - _MARGIN} tokens (its messages"
                + (f" + max_new_tokens={gen.max_new_tokens}" if gen else "")
                + f"), more than the model's context window of {self.context_window}"
            )
        work = TurnWork(key, prep, prep.state, tools=gen.tools if gen else None)
        context, how = self._reusable(key, prep, tools)
        if context is not None:
            if context.tokens + reserve <= self.kv_tokens:
                work.context, work.reused, work.kv = context, context.tokens, how
                return work
            self._count("slides")
            work.kv = "slid"
            self._rebuild(work, reserve, slide=True)
            return work
        self._rebuild(work, reserve, slide=False)
        return work

    def _reusable(self, key: tuple[str, str], prep: Prepared, tools: str) -> tuple[HotContext | None, str]:
        """The session's cache if it is the one of the state this call starts from: ``(context, "hot")`` from
        the pool, ``(context, "disk")`` from a file, or ``(None, "")``."""
        plan, data = prep.plan, prep.data
        if plan.base_turn != data.turn or plan.base_written != data.record.count:
            if self.pool is not None:
                self.pool.discard(key)  # a replay starts from an older snapshot: the cache is of a dropped turn
            return None, ""
        context = self.pool.take(key) if self.pool is not None else None
        if context is not None and context.belongs_to(data) and context.tools == tools:
            self._count("hits")
            return context, "hot"
        if self.files is not None:
            context = self.files.load(key, data, self.cache_config, self.runner.device)
            if context is not None and context.tools == tools:
                self._count("disk_hits")
                return context, "disk"
        return None, ""

    def _rebuild(self, work: TurnWork, reserve: int, *, slide: bool) -> None:
        """Re-prefill the already-written context that fits (writes off, reading the state): once per block."""
        plan = work.prep.plan
        context_items = [h for h in plan.history if h.index < plan.base_written]
        pinned = pinned_system(context_items)
        rest = context_items[len(pinned) :]
        limit = self.kv_tokens - reserve
        if slide or sum(i.tokens for i in context_items) > limit:
            limit = min(limit, int(self.kv_tokens * self.retain))
        kept: list[HistoryItem] = []
        used = sum(i.tokens for i in pinned)
        for item in reversed(rest):
            if used + item.tokens > limit:
                break
            kept.append(item)
            used += item.tokens
        kept = pinned + kept[::-1]
        new_msgs = [i.message for i in plan.new]
        while True:
            head = self.renderer.continuation_ids([i.message for i in kept], new_msgs, tools=work.tools)
            if len(head) + reserve <= self.context_window or not kept:
                break
            kept.pop(len(pinned) if len(kept) > len(pinned) else 0)
        cache = self.runner.new_cache()
        if self._defers_head(work, kept):
            work.pending_head = head
        else:
            _, _ = self.runner.forward(work.state, head, cache=cache, writes=False, want_logits=False)
        if work.kv is None:
            work.kv = "rebuilt" if kept else "new"
            self._count("misses" if kept else "new")
        if self.pool is not None:
            self.pool.stats.reprefilled_tokens += len(head) if kept else 0
        work.context = HotContext(
            cache, -1, "", tuple(i.index for i in kept), tuple(i.message.digest for i in kept),
            len(head) - sum(i.tokens for i in kept), tools_digest(work.tools),
        )
        work.reused = 0

    def _defers_head(self, work: TurnWork, kept: Sequence[HistoryItem]) -> bool:
        """Whether the template head of a new context waits to be run with the first message (authors' protocol)."""
        return False

    def _count(self, what: str) -> None:
        if self.pool is not None and hasattr(self.pool.stats, what):
            setattr(self.pool.stats, what, getattr(self.pool.stats, what) + 1)

    # -- writing ------------------------------------------------------------------------------------------
    def _write_continuing(self, work: TurnWork, items: Sequence[HistoryItem]) -> None:
        context = work.context
        assert context is not None
        for item in items:
            ids = self.renderer.message_ids(item.message)
            _, work.state = self.runner.forward(work.state, ids, cache=context.cache, writes=True,
                                                segment_id=item.index, want_logits=False)
            context.indices += (item.index,)
            context.digests += (item.message.digest,)
            work.written.append(self._record(item, len(ids)))

    def prompt(self, work: TurnWork, gen: GenOptions) -> Prompt:
        # The new messages are written as the prompt passes them: generation reads a state that holds them.
        self._write_continuing(work, work.prep.plan.new)
        assert work.context is not None
        work.header_at = cache_length(work.context.cache)
        work.mark = cache_mark(work.context.cache)
        header = list(self.renderer.generation_header_ids)
        return Prompt(work.context.cache, work.state, header, work.header_at + len(header), work.reused)

    def write_new(self, work: TurnWork) -> None:
        self._write_continuing(work, work.prep.plan.new)

    def write_reply(self, work: TurnWork, prompt: Prompt, reply: HistoryItem,
                    generated: GenerationEvent | None = None) -> None:
        context = work.context
        assert context is not None
        # Drop the generation's tokens (header + generated): the reply is written as a message continuing the
        # conversation, exactly as a resent copy of it would be.
        assert work.mark is not None and work.mark.length == work.header_at
        cache_rewind(context.cache, work.mark)
        work.mark = None
        if cache_length(context.cache) + reply.tokens > self.context_window:
            # Only when a reply outgrew the reserve: slide now so the reply fits.
            self._count("slides")
            self._rebuild_with_written(work, reply.tokens + _MARGIN)
        self._write_continuing(work, [reply])

    def _rebuild_with_written(self, work: TurnWork, reserve: int) -> None:
        plan = work.prep.plan
        written = {w.index for w in work.written}
        items = [h for h in plan.history if h.index < plan.base_written or h.index in written]
        prep = Prepared(work.prep.data, TurnPlan(plan.style, plan.base_turn, plan.base_written + len(written), items,
                                                 [], plan.diverged_at), work.state)
        inner = TurnWork(work.key, prep, work.state, kv="slid", tools=work.tools)
        self._rebuild(inner, reserve, slide=True)
        work.context = inner.context

    def window(self, work: TurnWork, items: Sequence[HistoryItem]) -> list[WindowMessage]:
        # The text of what the KV context holds: enough to re-prefill it after a restart for a client that
        # sends only new messages.
        assert work.context is not None
        held = set(work.context.indices)
        return _window_messages([i for i in items if i.index in held])

    def committed(self, work: TurnWork, info: SessionInfo, blobs: list[TensorBlob]) -> None:
        context = work.context
        if context is None:
            return
        context.version = info.version
        context.state = state_digest(blobs)
        context.record = extend_history(work.prep.plan.base_history, (w.digest for w in work.written))
        if self.pool is not None:
            self.pool.put(work.key, context)
        elif self.files is not None:
            self.files.save(work.key, context)

    def abandon(self, work: TurnWork) -> None:
        work.context = None  # taken out of the pool at begin: dropping it is enough

    def forget(self, key: tuple[str, str]) -> None:
        if self.pool is not None:
            self.pool.discard(key)
        if self.files is not None:
            self.files.delete(key)


# ---------------------------------------------------------------------------------------------- authors' protocol
class AuthorsTurns(OnlineTurns):
    """``online`` under the authors' chat protocol (``MemoryEngine(protocol="authors")``; an option, off by
    default): what declare-lab/delta-Mem's ``DeltaMemChatSession.generate_reply`` writes, so that their published
    numbers can be reproduced with this engine (``docs/engine.md``, "Two protocols").

    Per turn, continuing the session's KV cache as :class:`OnlineTurns` does:

    1. The new messages **and the generation header** run in one call with writes (their ``_ingest_full_ids``
       of the render with ``add_generation_prompt=True``). SSW ids as their runtime gives them: a system
       message and the header ``-1`` (never written under ``ssw_semantics="official"``), any other message its
       history index. A new session's template head (SmolLM2's default system prompt) is written with the first
       message, as part of its render.
    2. Each generated token but EOS is run with writes (id: the reply's index), the last one included
       (:func:`~.generation.generate` with ``writes=True``).
    3. The reply's render as a message (:meth:`ChatRenderer.message_ids`, which starts with the generation
       header for ChatML) is compared with what the cache ran since the header: when the header and the
       generated tokens are a prefix of it, only the rest (``<|im_end|>`` and a newline) runs, with writes.
       Otherwise (the decoded text does not re-tokenize to the generated tokens, a stop string cut it, the
       template renders the reply otherwise), their session resets the state and the cache and writes the
       whole conversation from zero in one call: so does this one when the call holds the whole conversation
       (history indices 0…n, as before any slide). When older messages have left the window (the authors'
       session has none), the state and cache go back to the start of this turn instead and the turn's
       messages and reply are written in one call.

    Messages are rendered one by one (:meth:`ChatRenderer.message_ids`), which equals the authors' render of
    the whole conversation for templates whose render of a message does not depend on later messages (ChatML,
    Llama 3…). The written record is the default protocol's (the reply is recorded as the assistant message
    with the returned text), so a client resending it writes nothing twice.
    """

    name = "online"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: turns whose reply did not continue what the cache ran (step 3's reset or re-ingest)
        self.resets = 0

    @staticmethod
    def _segment(item: HistoryItem | None) -> int:
        """The authors' SSW message id of a message: ``-1`` (never written) for a system message."""
        return -1 if item is None or item.message.role == "system" else item.index

    def _defers_head(self, work: TurnWork, kept: Sequence[HistoryItem]) -> bool:
        # Nothing written yet: the head is part of the first message's render, written with it.
        return not kept and work.prep.plan.base_written == 0

    def _ingest(self, head: list[int], items: Sequence[HistoryItem], *,
                generation: bool) -> tuple[list[int], list[int]]:
        """Token ids ``(T,)`` of ``head``, ``items`` and (``generation``) the header, and their SSW ids ``(T,)``."""
        ids: list[int] = list(head)
        segs = [self._segment(items[0] if items else None)] * len(ids)
        for item in items:
            message = self.renderer.message_ids(item.message)
            ids += message
            segs += [self._segment(item)] * len(message)
        if generation:
            header = list(self.renderer.generation_header_ids)
            ids += header
            segs += [-1] * len(header)
        return ids, segs

    def _mark(self, work: TurnWork, items: Sequence[HistoryItem], *, record: bool = True) -> None:
        """``items`` are in the cache (and, with ``record``, written by this call)."""
        context = work.context
        assert context is not None
        for item in items:
            context.indices += (item.index,)
            context.digests += (item.message.digest,)
            if record:
                work.written.append(self._record(item, len(self.renderer.message_ids(item.message))))

    def prompt(self, work: TurnWork, gen: GenOptions) -> Prompt:
        assert work.context is not None
        plan = work.prep.plan
        work.turn_at = cache_length(work.context.cache)
        work.mark = cache_mark(work.context.cache)  # the start of the turn, for _reingest
        work.turn_head, work.pending_head = work.pending_head, []
        ids, segs = self._ingest(work.turn_head, plan.new, generation=True)
        self._mark(work, plan.new)
        work.header_at = work.turn_at + len(ids) - len(self.renderer.generation_header_ids)
        # generation runs ``ids`` with writes, then each token; its last event carries the state (write_reply)
        return Prompt(work.context.cache, work.state, ids, work.turn_at + len(ids), work.reused, writes=True,
                      segment_ids=segs, reply_segment=plan.history[-1].index + 1)

    def write_new(self, work: TurnWork) -> None:
        # their ingest of the render without the generation prompt: one call
        assert work.context is not None
        ids, segs = self._ingest(work.pending_head, work.prep.plan.new, generation=False)
        work.pending_head = []
        _, work.state = self.runner.forward(work.state, ids, cache=work.context.cache, writes=True,
                                            segment_id=segs, want_logits=False)
        self._mark(work, work.prep.plan.new)

    def write_reply(self, work: TurnWork, prompt: Prompt, reply: HistoryItem,
                    generated: GenerationEvent | None = None) -> None:
        context = work.context
        assert context is not None and generated is not None and generated.state is not None
        work.state = generated.state
        rendered = self.renderer.message_ids(reply.message)
        ran = list(self.renderer.generation_header_ids) + generated.ran
        rest = rendered[len(ran) :]
        if rendered[: len(ran)] == ran and cache_length(context.cache) + len(rest) <= self.context_window:
            # what the cache ran is a prefix of the render: only the closing tokens remain
            _, work.state = self.runner.forward(work.state, rest, cache=context.cache, writes=True,
                                                segment_id=self._segment(reply), want_logits=False)
            self._mark(work, [reply])
            return
        self.resets += 1
        self._reingest(work, reply)

    def _reingest(self, work: TurnWork, reply: HistoryItem) -> None:
        """Their reset: zero state, fresh cache, the whole conversation and the reply written in one call; or,
        when this call does not hold the whole conversation (or it does not fit the KV budget), the same from
        the start of this turn."""
        plan = work.prep.plan
        items = [*plan.history, reply]
        head = self.renderer.continuation_ids([], [items[0].message], tools=work.tools)
        whole = [i.index for i in items] == list(range(len(items)))
        if whole and len(head) + sum(len(self.renderer.message_ids(i.message)) for i in items) <= self.kv_tokens:
            ids, segs = self._ingest(head, items, generation=False)
            cache = self.runner.new_cache()
            _, work.state = self.runner.forward(self.runner.model.new_state(1), ids, cache=cache, writes=True,
                                                segment_id=segs, want_logits=False)
            work.context = HotContext(cache, -1, "", (), (), len(head), tools_digest(work.tools))
            self._mark(work, items[:-1], record=False)  # the new messages' records were made by prompt()
            self._mark(work, [reply])
            return
        context = work.context
        assert context is not None
        assert work.mark is not None and work.mark.length == work.turn_at
        cache_rewind(context.cache, work.mark)  # back to the start of the turn (sliding-window layers too)
        held = len(context.indices) - len(plan.new)
        context.indices, context.digests = context.indices[:held], context.digests[:held]
        ids, segs = self._ingest(work.turn_head, [*plan.new, reply], generation=False)
        _, work.state = self.runner.forward(work.prep.state, ids, cache=context.cache, writes=True,
                                            segment_id=segs, want_logits=False)
        self._mark(work, plan.new, record=False)
        self._mark(work, [reply])
