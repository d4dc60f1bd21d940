"""`MemoryEngine`: sessions with δ-mem memory at run time (design brief §2; user guide: ``docs/engine.md``).

How a turn runs (``chat`` / ``stream``; ``write`` is the same without the prompt and the generation):

1. Validate every message (role, content, size) — errors here change nothing.
2. Under the session's lock, load the latest snapshot and check its fingerprints; reconcile the call's messages
   with the written record (:mod:`.session`): already-written messages are skipped, new ones will be written, a
   diverging history rolls back to the latest snapshot before the divergence and replays the rest.
3. Build the prompt of the mode (``windowed``: the recent window as text; ``state-only``: only the current
   turn; ``online``: the whole conversation) and generate, reading the state (writes off).
4. Write: every new message, then the reply, each as the chat template renders it inside a conversation.
   ``windowed``/``state-only`` write each message **on its own** (one forward call over its tokens, no text
   context): the state after a history is then a pure fold over its messages, so a resend writes nothing, a
   replay gives bitwise the state of a fresh run, and ``write()`` gives bitwise the state ``chat()`` gives.
   ``online`` writes messages **as they pass** in the prompt (after the already-written history, which is run
   with writes off), the reply continuing the same context: paper-faithful, but then the state depends on how
   the conversation was split into calls (a replay is equivalent, not bitwise equal, to the original run).
5. Commit state, new records and window with the version read in 2; on a concurrent update, reload and write
   again (the reply is kept, not regenerated), a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import (
    AdapterMismatchError,
    DeltaMemConfig,
    DeltaMemModel,
    DeltaMemState,
    adapter_fingerprint,
    attach,
    base_model_fingerprint,
    import_official_adapter,
    load_adapter,
)
from ..store.base import (
    DEFAULT_NAMESPACE,
    ConcurrentUpdateError,
    SessionData,
    SessionInfo,
    SessionNotFoundError,
    SessionStats,
    SessionStore,
    TurnInfo,
    WindowMessage,
    WrittenMessage,
    validate_identifier,
)
from .batching import ModelRunner
from .errors import ContextLengthError, FingerprintMismatchError, InvalidMessageError
from .generation import generate
from .messages import Message, normalize_messages
from .rendering import ChatRenderer
from .results import ChatChunk, ChatResult, Usage, WriteResult
from .sampling import SamplingParams
from .serialization import blobs_to_state, state_to_blobs
from .session import HISTORY_STYLES, TurnPlan, plan_turn
from .window import HistoryItem, select_window

__all__ = ["MODES", "MemoryEngine"]

logger = logging.getLogger(__name__)

MODES = ("windowed", "online", "state-only")
_MODE_ALIASES = {"state_only": "state-only", "stateonly": "state-only"}


@dataclass(frozen=True)
class _GenOptions:
    max_new_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    tools: Any


@dataclass
class _Prepared:
    """A loaded session and the plan of a call."""

    data: SessionData
    plan: TurnPlan
    state: DeltaMemState  # the state at plan.base_turn


class MemoryEngine:
    """Run chat sessions whose memory is a δ-mem state, persisted in a session store.

    Args:
        model: ``None`` (the embedded SmolLM2-135M-Instruct), a path / hub id / GGUF file, a loaded
            ``(model, tokenizer)`` pair (the model a plain HF causal LM or a :class:`DeltaMemModel`), or a
            :class:`DeltaMemModel` (then pass ``tokenizer=``).
        adapter: ``None`` (the shipped default adapter when it fits the model; otherwise a fresh one, with a
            warning), a directory (our format, or the authors' ``delta_mem_config.json`` format), or ``"none"``
            (a fresh, untrained adapter, deterministically initialised so its fingerprint is stable).
        store: ``None`` (:func:`~deltamem_agents.store.open_store`: SQLite in the cache dir), a database URL, or a
            store object implementing :class:`~deltamem_agents.store.base.SessionStore`.
        mode: default mode: ``"windowed"``, ``"online"`` or ``"state-only"``.
        window_tokens: tokens of recent history kept as text in the windowed prompt.
        max_message_tokens: a message longer than this (as rendered) is refused.
        device, dtype: where and how to load a model given by name (defaults: CUDA if present, else CPU fp32).
        namespace: default namespace (tenant) of the session operations.
        tokenizer: the tokenizer, when ``model`` is a model object rather than a pair.
        history: default reconciliation style, ``"auto"``, ``"full"`` or ``"append"`` (see :mod:`.session`).
        max_retries: how many times a turn is written again after a concurrent update before giving up.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        adapter: str | os.PathLike[str] | None = None,
        store: SessionStore | str | None = None,
        mode: str = "windowed",
        window_tokens: int = 1024,
        max_message_tokens: int = 8192,
        device: Any = None,
        dtype: Any = None,
        namespace: str = DEFAULT_NAMESPACE,
        tokenizer: Any = None,
        history: str = "auto",
        max_retries: int = 3,
    ) -> None:
        self.default_mode = _check_mode(mode)
        if not isinstance(window_tokens, int) or window_tokens < 0:
            raise ValueError(f"window_tokens must be a non-negative integer, got {window_tokens!r}")
        if not isinstance(max_message_tokens, int) or max_message_tokens < 1:
            raise ValueError(f"max_message_tokens must be a positive integer, got {max_message_tokens!r}")
        if history not in HISTORY_STYLES:
            raise ValueError(f"history must be one of {HISTORY_STYLES}, got {history!r}")
        self.window_tokens = window_tokens
        self.max_message_tokens = max_message_tokens
        self.namespace = validate_identifier(namespace, "namespace")
        self.history = history
        self.max_retries = max_retries

        self.model, self._tokenizer, self.model_source = _resolve_model(model, adapter, tokenizer, device, dtype)
        self.model.eval()
        self.device = next(self.model.base_model.parameters()).device
        self.runner = ModelRunner(self.model, self.device)
        self.renderer = ChatRenderer(self._tokenizer)
        self._fingerprints = {
            "model": base_model_fingerprint(self.model.base_model),
            "adapter": adapter_fingerprint(self.model),
        }
        self.eos_ids = _eos_ids(self.model.base_model, self._tokenizer)

        self._owns_store = store is None or isinstance(store, str | os.PathLike)
        if store is None or isinstance(store, str | os.PathLike):
            from ..store import open_store

            store = open_store(None if store is None else str(store))
        self.store: SessionStore = store
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_name(self) -> str:
        cfg = self.model.base_model.config
        return str(getattr(cfg, "_name_or_path", "") or self.model_source or getattr(cfg, "model_type", "model"))

    @property
    def context_window(self) -> int:
        cfg = self.model.base_model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(getattr(cfg, "max_position_embeddings", None) or 4096)

    @property
    def fingerprints(self) -> dict[str, str]:
        """``{"model": …, "adapter": …}``: what every session written by this engine is stamped with."""
        return dict(self._fingerprints)

    def close(self) -> None:
        """Close the store if the engine opened it."""
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> MemoryEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ sessions
    def create_session(
        self, session_id: str | None = None, *, namespace: str | None = None, metadata: dict[str, Any] | None = None
    ) -> SessionInfo:
        """Create a fresh session (a random id when ``session_id`` is None). Raises ``SessionExistsError``."""
        ns = self._ns(namespace)
        sid = session_id if session_id is not None else uuid.uuid4().hex
        return self.store.create(
            sid, namespace=ns, model_fingerprint=self._fingerprints["model"],
            adapter_fingerprint=self._fingerprints["adapter"], metadata=metadata,
        )

    def get_session(self, session_id: str, *, namespace: str | None = None) -> SessionInfo:
        return self.store.get(session_id, namespace=self._ns(namespace))

    def list_sessions(self, *, namespace: str | None = None, all_namespaces: bool = False, limit: int = 100,
                      offset: int = 0) -> list[SessionInfo]:
        return self.store.list_sessions(
            namespace=None if all_namespaces else self._ns(namespace), limit=limit, offset=offset
        )

    def list_turns(self, session_id: str, *, namespace: str | None = None) -> list[TurnInfo]:
        return self.store.list_turns(session_id, namespace=self._ns(namespace))

    def fork(self, session_id: str, new_id: str | None = None, *, namespace: str | None = None,
             new_namespace: str | None = None, turn: int | None = None) -> SessionInfo:
        """Copy a session (its snapshots up to ``turn``, default latest) to ``new_id``; the source is untouched."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            return self.store.fork(session_id, new_id or uuid.uuid4().hex, namespace=ns,
                                   new_namespace=new_namespace, turn=turn)

    def rollback(self, session_id: str, turn: int, *, namespace: str | None = None) -> SessionInfo:
        """Go back to the snapshot after ``turn`` (later turns are dropped)."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            return self.store.rollback(session_id, namespace=ns, turn=turn)

    def reset(self, session_id: str, *, namespace: str | None = None) -> SessionInfo:
        """Forget everything: zero state, no record, no window, no snapshots (the session id stays)."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            return self.store.reset(session_id, namespace=ns)

    def delete(self, session_id: str, *, namespace: str | None = None) -> None:
        """Delete the session with its state, snapshots, record and window."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            self.store.delete(session_id, namespace=ns)

    def stats(self, session_id: str, *, namespace: str | None = None) -> SessionStats:
        return self.store.stats(session_id, namespace=self._ns(namespace))

    def session_state(self, session_id: str, *, namespace: str | None = None, turn: int | None = None) -> DeltaMemState:
        """The session's state (1 row) as of ``turn`` (default latest), fingerprint-checked."""
        data = self.store.load(session_id, namespace=self._ns(namespace), turn=turn)
        self._check_fingerprints(data.info)
        return blobs_to_state(data.state, self.model)

    def export_session(self, session_id: str, path: str | os.PathLike[str], *, namespace: str | None = None,
                       turn: int | None = None) -> Path:
        """Write the session (state, written record, window, fingerprints) to one portable safetensors file."""
        from .portable import export_session

        ns = self._ns(namespace)
        data = self.store.load(session_id, namespace=ns, turn=turn)
        self._check_fingerprints(data.info)
        state = blobs_to_state(data.state, self.model)
        return export_session(path, data, state, self._fingerprints, self.model_name, self.model.config)

    def import_session(self, path: str | os.PathLike[str], session_id: str | None = None, *,
                       namespace: str | None = None) -> SessionInfo:
        """Create a session from an exported file (the file's id unless ``session_id`` is given).

        Raises :class:`FingerprintMismatchError` when the file was written with another model or adapter,
        :class:`InvalidStateError` for NaN/Inf or a foreign layout, ``SessionExistsError`` when the id is taken;
        in every case nothing is created.
        """
        from .portable import read_export

        exported = read_export(path)
        fp = exported.fingerprints
        if fp.get("model") != self._fingerprints["model"] or fp.get("adapter") != self._fingerprints["adapter"]:
            raise FingerprintMismatchError(
                f"{path} was written with model {fp.get('model', '?')[:12]}… / adapter {fp.get('adapter', '?')[:12]}…; "
                f"this engine runs model {self._fingerprints['model'][:12]}… / adapter "
                f"{self._fingerprints['adapter'][:12]}…"
            )
        from .serialization import check_state

        check_state(exported.state, self.model)
        ns = self._ns(namespace if namespace is not None else exported.namespace)
        sid = session_id or exported.session_id
        with self._session_lock(ns, sid):
            info = self.store.create(sid, namespace=ns, model_fingerprint=fp["model"],
                                     adapter_fingerprint=fp["adapter"], metadata=exported.metadata)
            try:
                return self.store.commit(sid, namespace=ns, expected_version=info.version,
                                         state=state_to_blobs(exported.state), written=exported.written,
                                         window=exported.window)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.store.delete(sid, namespace=ns)
                raise

    # ------------------------------------------------------------------------------------------ turns
    def write(
        self,
        session_id: str,
        messages: Any,
        *,
        namespace: str | None = None,
        mode: str | None = None,
        history: str | None = None,
        create_if_missing: bool = True,
    ) -> WriteResult:
        """Write messages into the session's state without generating (idempotent: see the module docstring)."""
        ns, mode_ = self._ns(namespace), _check_mode(mode or self.default_mode)
        msgs, counts = self._validate(messages)
        with self._session_lock(ns, session_id):
            prep = self._prepare(session_id, ns, msgs, counts, history or self.history, create_if_missing)
            if not prep.plan.new and not prep.plan.replayed:
                info = prep.data.info
                return WriteResult(session_id, ns, info.turn, 0, 0)
            state, written, _ = self._write_items(prep.state, prep.plan, prep.plan.new, mode_)
            window = self._window(prep.plan.history)
            info = self._commit(session_id, ns, prep, state, written, window, msgs, counts, mode_)
        return WriteResult(
            session_id, ns, info.turn, len(written), sum(w.tokens for w in written),
            prep.plan.replayed, prep.plan.base_turn if prep.plan.replayed else None,
        )

    def chat(self, session_id: str, messages: Any, **kwargs: Any) -> ChatResult:
        """Answer the conversation and remember it. Keyword arguments as :meth:`stream`."""
        result = None
        for chunk in self.stream(session_id, messages, **kwargs):
            if chunk.result is not None:
                result = chunk.result
        assert result is not None
        return result

    def stream(
        self,
        session_id: str,
        messages: Any,
        *,
        namespace: str | None = None,
        mode: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        tools: Any = None,
        history: str | None = None,
        create_if_missing: bool = True,
        _cancelled: threading.Event | None = None,
    ) -> Iterator[ChatChunk]:
        """Stream the answer as text deltas; the last chunk carries ``finish_reason``, ``usage`` and ``result``.

        Messages are validated here, eagerly (before the first ``next()``). The turn is committed when the last
        chunk is produced; a stream closed early commits nothing (nothing is written, the session is unchanged).
        The session stays locked while the stream is open.
        """
        ns, mode_ = self._ns(namespace), _check_mode(mode or self.default_mode)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        gen = _GenOptions(max_new_tokens, SamplingParams(temperature, top_p, top_k, seed), stops, tools)
        style = history or self.history
        if style not in HISTORY_STYLES:
            raise ValueError(f"history must be one of {HISTORY_STYLES}, got {style!r}")
        msgs, counts = self._validate(messages)
        return self._stream(session_id, ns, mode_, msgs, counts, gen, style, create_if_missing, _cancelled)

    async def achat(self, session_id: str, messages: Any, **kwargs: Any) -> ChatResult:
        """:meth:`chat` in a worker thread (the event loop stays free)."""
        return await asyncio.to_thread(self.chat, session_id, messages, **kwargs)

    async def awrite(self, session_id: str, messages: Any, **kwargs: Any) -> WriteResult:
        """:meth:`write` in a worker thread."""
        return await asyncio.to_thread(self.write, session_id, messages, **kwargs)

    async def astream(self, session_id: str, messages: Any, **kwargs: Any) -> AsyncIterator[ChatChunk]:
        """:meth:`stream` driven by a worker thread; chunks arrive through a queue. Leaving the ``async for``
        early stops generation at the next token and commits nothing."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        done = object()
        iterator = self.stream(session_id, messages, _cancelled=cancelled, **kwargs)  # validates eagerly

        def pump() -> None:
            try:
                for chunk in iterator:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except BaseException as exc:  # handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = loop.run_in_executor(None, pump)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(worker)

    # ------------------------------------------------------------------------------------------ internals
    def _ns(self, namespace: str | None) -> str:
        return validate_identifier(namespace, "namespace") if namespace is not None else self.namespace

    @contextlib.contextmanager
    def _session_lock(self, namespace: str, session_id: str) -> Iterator[None]:
        """Serialise the requests of one session in this process (other processes: the store's versions)."""
        key = (namespace, session_id)
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _validate(self, messages: Any) -> tuple[list[Message], list[int]]:
        msgs = normalize_messages(messages)
        if not msgs:
            raise InvalidMessageError("no messages given")
        counts = []
        for i, m in enumerate(msgs):
            n = len(self.renderer.message_ids(m))
            if n > self.max_message_tokens:
                raise InvalidMessageError(
                    f"message {i} has {n} tokens, more than max_message_tokens={self.max_message_tokens}"
                )
            counts.append(n)
        return msgs, counts

    def _check_fingerprints(self, info: SessionInfo) -> None:
        if info.model_fingerprint != self._fingerprints["model"]:
            raise FingerprintMismatchError(
                f"session {info.namespace}/{info.session_id} was written with another base model "
                f"(fingerprint {info.model_fingerprint[:12]}…, this engine's {self._fingerprints['model'][:12]}…)"
            )
        if info.adapter_fingerprint != self._fingerprints["adapter"]:
            raise FingerprintMismatchError(
                f"session {info.namespace}/{info.session_id} was written with another adapter "
                f"(fingerprint {info.adapter_fingerprint[:12]}…, this engine's {self._fingerprints['adapter'][:12]}…)"
            )

    def _load(self, session_id: str, ns: str, create_if_missing: bool) -> SessionData:
        try:
            data = self.store.load(session_id, namespace=ns)
        except SessionNotFoundError:
            if not create_if_missing or self.store.exists(session_id, namespace=ns):
                raise
            self.create_session(session_id, namespace=ns)
            data = self.store.load(session_id, namespace=ns)
        self._check_fingerprints(data.info)
        return data

    def _prepare(self, session_id: str, ns: str, msgs: list[Message], counts: list[int], style: str,
                 create_if_missing: bool) -> _Prepared:
        data = self._load(session_id, ns, create_if_missing)
        turns = self.store.list_turns(session_id, namespace=ns) if data.written else []
        plan = plan_turn(style, msgs, counts, data.written, turns, data.info.turn, data.window)
        if plan.base_turn == data.turn:
            blobs = data.state
        elif plan.base_turn >= 0:
            blobs = self.store.load(session_id, namespace=ns, turn=plan.base_turn).state
        else:
            blobs = []
        # Deserialise (and check finiteness / layout) before anything is generated or written.
        return _Prepared(data, plan, blobs_to_state(blobs, self.model))

    def _window(self, items: Sequence[HistoryItem]) -> list[WindowMessage]:
        kept = select_window(items, self.window_tokens, keep_last=1)
        return [WindowMessage(i.index, i.message.role, i.message.content, i.tokens) for i in kept]

    def _write_items(
        self, state: DeltaMemState, plan: TurnPlan, items: Sequence[HistoryItem], mode: str, *,
        online_cache: Any = None,
    ) -> tuple[DeltaMemState, list[WrittenMessage], Any]:
        """Write ``items`` in order; returns the state, their records and (online) the KV cache after them.

        ``windowed``/``state-only``: each message in its own forward call with no text context.
        ``online``: continuing ``online_cache`` (built here from the already-written history when None); when
        the context would overflow, it restarts empty (deterministically, for a given sequence of calls).
        """
        records: list[WrittenMessage] = []
        cache = online_cache
        if mode == "online" and cache is None and items:
            cache = self.runner.new_cache()
            context = [h for h in plan.history if h.index < plan.base_written]
            head = self.renderer.continuation_ids(
                [h.message for h in self._fit_history(context, sum(i.tokens for i in items), 0)],
                [i.message for i in items],
            )
            _, state = self.runner.forward(state, head, cache=cache, writes=False, want_logits=False)
        for item in items:
            ids = self.renderer.message_ids(item.message)
            if mode == "online":
                if cache.get_seq_length() + len(ids) > self.context_window:
                    cache = self.runner.new_cache()
                _, state = self.runner.forward(state, ids, cache=cache, writes=True, segment_id=item.index,
                                               want_logits=False)
            else:
                _, state = self.runner.forward(state, ids, writes=True, segment_id=item.index, want_logits=False)
            records.append(WrittenMessage(item.index, item.message.role, item.message.digest, len(ids)))
        return state, records, cache

    def _fit_history(self, context: list[HistoryItem], reserved: int, max_new: int) -> list[HistoryItem]:
        """Drop the oldest (non-pinned) history messages until history + ``reserved`` + ``max_new`` fit."""
        context = list(context)
        budget = self.context_window - reserved - max_new - len(self.renderer.generation_header_ids) - 16
        pinned = context[:1] if context and context[0].index == 0 and context[0].message.role == "system" else []
        rest = context[len(pinned) :]
        while rest and sum(i.tokens for i in pinned + rest) > budget:
            rest.pop(0)
        return pinned + rest

    def _prompt_items(self, plan: TurnPlan, mode: str) -> tuple[list[HistoryItem], int]:
        """The prompt's messages for windowed / state-only, and how many trailing ones must stay."""
        history = plan.history
        last_assistant = max((p for p, h in enumerate(history) if h.message.role == "assistant"), default=-1)
        current = max(1, len(history) - 1 - last_assistant)
        if mode == "state-only":
            pinned = history[:1] if history and history[0].index == 0 and history[0].message.role == "system" else []
            tail = history[-current:]
            return (pinned + [h for h in tail if h not in pinned]), current
        return select_window(history, self.window_tokens, keep_last=current), current

    def _fit_prompt(self, items: list[HistoryItem], forced: int, gen: _GenOptions) -> tuple[list[int], list[HistoryItem]]:
        items = list(items)
        while True:
            ids = self.renderer.prompt_ids([i.message for i in items], tools=gen.tools)
            if len(ids) + gen.max_new_tokens <= self.context_window:
                return ids, items
            pinned = items[0] if items and items[0].index == 0 and items[0].message.role == "system" else None
            droppable = [i for i in items[: len(items) - forced] if i is not pinned]
            if not droppable:
                raise ContextLengthError(
                    f"the current turn needs {len(ids)} prompt tokens + max_new_tokens={gen.max_new_tokens}, more "
                    f"than the model's context window of {self.context_window}"
                )
            items.remove(droppable[0])

    def _full_context_tokens(self, plan: TurnPlan, record: Sequence[WrittenMessage]) -> int:
        earlier = sum(r.tokens for r in record[: plan.base_written])
        new = sum(i.tokens for i in plan.new)
        first = plan.history[0] if plan.history and plan.history[0].index == 0 else None
        # what the template puts before the first message (SmolLM2: a default system prompt)
        head = len(self.renderer.continuation_ids([], [first.message])) if first is not None else 0
        return head + earlier + new + len(self.renderer.generation_header_ids)

    def _stream(self, session_id: str, ns: str, mode: str, msgs: list[Message], counts: list[int],
                gen: _GenOptions, style: str, create_if_missing: bool,
                cancelled: threading.Event | None) -> Iterator[ChatChunk]:
        with self._session_lock(ns, session_id):
            prep = self._prepare(session_id, ns, msgs, counts, style, create_if_missing)
            plan, state0 = prep.plan, prep.state
            written: list[WrittenMessage] = []
            if mode == "online":
                context = [h for h in plan.history if h.index < plan.base_written]
                new_tokens = sum(i.tokens for i in plan.new)
                context = self._fit_history(context, new_tokens, gen.max_new_tokens)
                head = self.renderer.continuation_ids([h.message for h in context], [i.message for i in plan.new],
                                                      tools=gen.tools)
                prompt_len = len(head) + new_tokens + len(self.renderer.generation_header_ids)
                if prompt_len + gen.max_new_tokens > self.context_window:
                    raise ContextLengthError(
                        f"online prompt needs {prompt_len} tokens + max_new_tokens={gen.max_new_tokens}, more than "
                        f"the context window of {self.context_window}"
                    )
                cache = self.runner.new_cache()
                _, state = self.runner.forward(state0, head, cache=cache, writes=False, want_logits=False)
                state, written, cache = self._write_items(state, plan, plan.new, mode, online_cache=cache)
                before_header = cache.get_seq_length()
                read_state, tail = state, list(self.renderer.generation_header_ids)
            else:
                items, forced = self._prompt_items(plan, mode)
                prompt, _ = self._fit_prompt(items, forced, gen)
                prompt_len = len(prompt)
                cache, read_state, tail = self.runner.new_cache(), state0, prompt

            pieces: list[str] = []
            final = None
            for event in generate(
                self.runner, read_state, cache, tail, max_new_tokens=gen.max_new_tokens, params=gen.params,
                eos_ids=self.eos_ids, stop=gen.stop, tokenizer=self._tokenizer, cancelled=cancelled,
            ):
                if event.text:
                    pieces.append(event.text)
                if event.finish_reason is None:
                    yield ChatChunk(event.text, session_id)
                else:
                    final = event
            assert final is not None
            if final.finish_reason == "cancelled":
                return
            reply_text = final.full_text
            reply = Message("assistant", reply_text)
            next_index = plan.history[-1].index + 1
            reply_item = HistoryItem(next_index, reply, len(self.renderer.message_ids(reply)))

            if mode == "online":
                # The reply is written as a message continuing the conversation: drop the generation's tokens
                # (negative = tokens to remove, in transformers 4.x and 5.x alike).
                extra = cache.get_seq_length() - before_header
                if extra > 0:
                    cache.crop(-extra)
                state, reply_written, _ = self._write_items(state, plan, [reply_item], mode, online_cache=cache)
                written += reply_written
            else:
                state, written, _ = self._write_items(state0, plan, [*plan.new, reply_item], mode)
            window = self._window([*plan.history, reply_item])
            info = self._commit(session_id, ns, prep, state, written, window, [*msgs, reply],
                                [*counts, reply_item.tokens], mode)
            usage = Usage(
                prompt_tokens=prompt_len,
                completion_tokens=final.tokens,
                written_tokens=sum(w.tokens for w in written),
                full_context_tokens=self._full_context_tokens(plan, prep.data.written),
            )
            result = ChatResult(
                text=reply_text, finish_reason=final.finish_reason, usage=usage, session_id=session_id,
                namespace=ns, turn=info.turn, replayed=plan.replayed,
                rolled_back_to=plan.base_turn if plan.replayed else None, written_messages=len(written),
                mode=mode,
            )
        yield ChatChunk(final.text, session_id, finish_reason=final.finish_reason, usage=usage, result=result)

    def _commit(self, session_id: str, ns: str, prep: _Prepared, state: DeltaMemState,
                written: list[WrittenMessage], window: list[WindowMessage], all_msgs: list[Message],
                all_counts: list[int], mode: str) -> SessionInfo:
        """Commit a turn; on a concurrent update reload and write ``all_msgs`` again on the fresh session."""
        attempt = 0
        while True:
            try:
                base_turn = prep.plan.base_turn
                version = prep.data.info.version
                if base_turn < 0:  # replay from nothing: every old-enough snapshot was pruned
                    version = self.store.reset(session_id, namespace=ns, expected_version=version).version
                    base_turn = 0
                return self.store.commit(
                    session_id, namespace=ns, expected_version=version, state=state_to_blobs(state),
                    written=written, window=window, base_turn=base_turn,
                )
            except ConcurrentUpdateError:
                attempt += 1
                if attempt > self.max_retries:
                    raise
                logger.info("session %s/%s changed concurrently; writing again (attempt %d)", ns, session_id, attempt)
                # In append style the call's messages (and reply) follow whatever the other writer added.
                prep = self._prepare(session_id, ns, all_msgs, all_counts, prep.plan.style, False)
                if not prep.plan.new and not prep.plan.replayed:
                    return prep.data.info
                state, written, _ = self._write_items(prep.state, prep.plan, prep.plan.new, mode)
                window = self._window(prep.plan.history)


# ---------------------------------------------------------------------------------------------- helpers
def _check_mode(mode: str) -> str:
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _fresh_adapter(model: nn.Module) -> DeltaMemModel:
    # Seeded so that a fresh adapter has the same weights (and fingerprint) in every process: sessions written
    # with adapter="none" stay loadable after a restart.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return attach(model, DeltaMemConfig())


def _attach_adapter(model: nn.Module, adapter: Any) -> DeltaMemModel:
    if adapter is not None and str(adapter).lower() == "none":
        return _fresh_adapter(model)
    if adapter is None:
        from ..adapter.shipped import shipped_adapter_dir

        shipped = shipped_adapter_dir()
        if shipped is None:
            logger.warning("no trained δ-mem adapter is installed; using a fresh, untrained adapter "
                           "(the state is written but carries little until an adapter is trained)")
            return _fresh_adapter(model)
        try:
            return load_adapter(model, shipped)
        except AdapterMismatchError as exc:
            logger.warning("the shipped adapter does not fit this model (%s); using a fresh, untrained adapter", exc)
            return _fresh_adapter(model)
    path = Path(adapter).expanduser()
    if (path / "adapter_config.json").is_file():
        return load_adapter(model, path)
    if (path / "delta_mem_config.json").is_file():
        return import_official_adapter(model, path)
    raise FileNotFoundError(f"no δ-mem adapter in {path} (expected adapter_config.json or delta_mem_config.json)")


def _resolve_model(model: Any, adapter: Any, tokenizer: Any, device: Any, dtype: Any) -> tuple[DeltaMemModel, Any, str]:
    source = "object"
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError("model as a tuple must be (model, tokenizer)")
        model, tokenizer = model
    if model is None or isinstance(model, str | os.PathLike):
        from ..models import load_base_model

        source = "embedded" if model is None else str(model)
        model, loaded_tok = load_base_model(model, device=device, dtype=dtype)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError("a tokenizer is needed: pass (model, tokenizer) or tokenizer=")
    if isinstance(model, DeltaMemModel):
        if adapter is not None:
            raise ValueError("model is already a DeltaMemModel; do not pass adapter=")
        return model, tokenizer, source
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be None, a path/hub id, a model or (model, tokenizer), got {type(model).__name__}")
    return _attach_adapter(model, adapter), tokenizer, source
