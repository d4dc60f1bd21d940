"""`MemoryEngine`: sessions with δ-mem memory at run time (design brief §2; user guide: ``docs/engine.md``).

The engine is a façade: the session store keeps sessions, :mod:`.session` reconciles a call's messages with what
was written, :mod:`.turns` runs the call in its mode, :mod:`.generation` decodes. How a turn runs (``chat`` /
``stream``; ``write`` is the same without the prompt and the generation):

1. Validate every message (role, content, size, count) and every option — errors here change nothing.
2. Under the session's lock, load the latest snapshot (a missing session is the fresh one; it is created by the
   commit) and check its fingerprints; reconcile the call's messages with the written record
   (:mod:`.session`): already-written messages are skipped, new ones will be written, a diverging history is a
   :class:`HistoryConflictError` (``on_divergence="reject"``, the default) or rolls back to the latest snapshot
   before the divergence and replays the rest (``"rollback"``) — decided before anything is generated.
3. The mode builds the prompt and writes the messages (:mod:`.turns`): ``online`` (default) continues the
   session's hot KV cache and writes each new message as it passes; ``windowed``/``state-only`` prompt with
   text and write each message on its own after generation.
4. Generate (every generated token reads the state, nothing is written), then write the reply as a message.
   Decode steps are the session's own forward calls, or (``batch_decode=True``) batched with the steps of other
   sessions generating at the same time (:mod:`.decode_batcher`). With ``protocol="authors"`` (an option) the
   generation header and each generated token are written as they run, as the authors' chat session does
   (:class:`~.turns.AuthorsTurns`).
5. Commit state, new records and window with the version read in 2 — a turn is two store transactions, load
   and commit. On a concurrent update, reload, plan again with the same rules and write again (the reply is
   kept, not regenerated), a bounded number of times. Only after the commit does the mode keep its KV cache for
   the next turn.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..adapter import DeltaMemState, adapter_fingerprint, base_model_fingerprint
from ..models.resolve import eos_token_ids, resolve_model
from ..store.base import (
    DEFAULT_NAMESPACE,
    ConcurrentUpdateError,
    SessionData,
    SessionExistsError,
    SessionInfo,
    SessionNotFoundError,
    SessionStats,
    SessionStore,
    TurnInfo,
    validate_identifier,
)
from .batching import ModelRunner
from .decode_batcher import BatchStats, DecodeBatcher
from .decode_group import model_can_batch
from .errors import (
    FingerprintMismatchError,
    HistoryConflictError,
    InvalidMessageError,
    InvalidOptionError,
    MessageTooLongError,
    TooManyMessagesError,
)
from .generation import generate
from .kv_files import KVCacheFiles
from .kv_pool import KVCachePool, KVCacheStats
from .messages import Message, normalize_message, normalize_messages
from .options import check_bool, check_choice, check_int, check_max_new_tokens, check_stop, check_tools
from .rendering import ChatRenderer
from .results import ChatChunk, ChatResult, Usage, WriteResult
from .sampling import SamplingParams
from .serialization import blobs_to_state, state_to_blobs
from .session import DIVERGENCE_POLICIES, HISTORY_STYLES, TurnPlan, plan_turn
from .tool_calls import ParsedReply, ToolCallFormat, detect_tool_format
from .turns import (
    AuthorsTurns,
    GenOptions,
    OnlineTurns,
    Prepared,
    StateOnlyTurns,
    TurnMode,
    TurnWork,
    WindowedTurns,
)
from .window import HistoryItem

__all__ = ["DEFAULT_SAMPLING", "MODES", "PROTOCOLS", "MemoryEngine"]

logger = logging.getLogger(__name__)

MODES = ("online", "windowed", "state-only")
#: What a chat turn writes: ours (the default: the reply is written afterwards as a message) or the authors'
#: (the generation header and each generated token are written as they run; ``online`` mode only).
PROTOCOLS = ("deltamem", "authors")
_MODE_ALIASES = {"state_only": "state-only", "stateonly": "state-only"}

#: Generation defaults for chat: light sampling with a repetition penalty over the generated tokens. On the
#: embedded SmolLM2-135M greedy decoding loops within a few sentences (its model card samples at 0.2 / 0.9);
#: ``temperature=0`` stays available and deterministic.
DEFAULT_SAMPLING = SamplingParams(temperature=0.2, top_p=0.9, repetition_penalty=1.1)
DEFAULT_MAX_NEW_TOKENS = 512
#: Most messages one call may carry unless ``max_messages_per_call`` says otherwise.
DEFAULT_MAX_MESSAGES_PER_CALL = 1000
_UNSET: Any = object()


@dataclass(frozen=True)
class _Call:
    """What one call asks of its session, as validated: planned again with the same rules after a concurrent
    commit."""

    session_id: str
    namespace: str
    style: str
    on_divergence: str
    expected_version: int | None
    create_if_missing: bool


class MemoryEngine:
    """Run chat sessions whose memory is a δ-mem state (long-term) and a hot KV cache (short-term).

    Args:
        model: ``None`` (the embedded SmolLM2-135M-Instruct), a path / hub id / GGUF file, a loaded
            ``(model, tokenizer)`` pair (the model a plain HF causal LM or a :class:`DeltaMemModel`), or a
            :class:`DeltaMemModel` (then pass ``tokenizer=``).
        adapter: ``None`` (the shipped default adapter when it fits the model; otherwise a fresh one, with a
            warning), a directory (our format, or the authors' ``delta_mem_config.json`` format), or ``"none"``
            (a fresh, untrained adapter, deterministically initialised so its fingerprint is stable).
        store: ``None`` (:func:`~deltamem_agents.store.open_store`: SQLite in the cache dir), a database URL, or a
            store object implementing :class:`~deltamem_agents.store.base.SessionStore`.
        mode: default mode: ``"online"`` (default), ``"windowed"`` or ``"state-only"`` (see ``docs/engine.md``).
        window_tokens: ``windowed``: tokens of recent history kept as text in the prompt.
        kv_tokens: ``online``: the KV budget of a session (default: the model's context window).
        kv_retain: ``online``: fraction of ``kv_tokens`` kept when the budget fills (the rest is re-prefilled
            once, then room for the next turns).
        kv_cache_bytes: ``online``: bytes of hot KV caches kept in this process, over all sessions (LRU).
            ``0`` keeps none: every turn re-prefills its context.
        kv_cache_dir: ``online``: a directory where KV caches are saved when they leave memory (LRU eviction,
            :meth:`close`) and loaded by a later turn or process, so a resumed session skips its re-prefill.
            ``None`` (default): not persisted.
        kv_cache_dir_bytes: size cap of ``kv_cache_dir`` (least recently used files go first).
        max_message_tokens: a message longer than this (as rendered) is refused.
        max_new_tokens, sampling: generation defaults of ``chat``/``stream`` (:data:`DEFAULT_SAMPLING`).
        device, dtype: where and how to load a model given by name (defaults: CUDA if present, else CPU fp32).
        namespace: default namespace (tenant) of the session operations.
        tokenizer: the tokenizer, when ``model`` is a model object rather than a pair.
        history: default reconciliation style, ``"auto"``, ``"full"`` or ``"append"`` (see :mod:`.session`).
        on_divergence: default for a history that diverges from what the session holds: ``"reject"``
            (:class:`HistoryConflictError`, nothing written) or ``"rollback"`` (roll back and replay the call's
            history: edits and "regenerate" of a single client). See ``docs/engine.md``, "Several clients on
            one session".
        max_messages_per_call: a call with more messages is refused (:class:`TooManyMessagesError`) before any
            work.
        max_retries: how many times a turn is planned and written again after a concurrent update before giving
            up.
        batch_decode: run the decode steps of sessions generating at the same time as one batched forward
            (continuous batching; an extension, off by default). Each session then equals running alone within
            a floating-point tolerance, not bitwise; it pays on a GPU with many concurrent sessions
            (``docs/engine.md``, "Concurrency"). A model whose KV cache cannot be batched decodes alone.
        batch_max_rows: ``batch_decode``: most sessions in one batched step (later ones wait for a row).
        protocol: what a chat turn writes. ``"deltamem"`` (default): the reply is written after generation as
            the assistant message, exactly as a resent copy of it would be. ``"authors"`` (an option): the
            authors' chat/evaluation protocol (declare-lab/delta-Mem's ``generate_reply``): the generation
            header and every generated token are written as they run, then the reply's closing tokens
            (``docs/engine.md``, "Two protocols"). ``online`` mode only, not with ``batch_decode``, and with SSW
            only under ``ssw_semantics="official"``; anything else is an :class:`InvalidOptionError`.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        adapter: str | os.PathLike[str] | None = None,
        store: SessionStore | str | None = None,
        mode: str = "online",
        window_tokens: int = 1024,
        kv_tokens: int | None = None,
        kv_retain: float = 0.5,
        kv_cache_bytes: int = 2 * 1024**3,
        kv_cache_dir: str | os.PathLike[str] | None = None,
        kv_cache_dir_bytes: int = 8 * 1024**3,
        max_message_tokens: int = 8192,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sampling: SamplingParams | None = None,
        device: Any = None,
        dtype: Any = None,
        namespace: str = DEFAULT_NAMESPACE,
        tokenizer: Any = None,
        history: str = "auto",
        on_divergence: str = "reject",
        max_messages_per_call: int = DEFAULT_MAX_MESSAGES_PER_CALL,
        max_retries: int = 3,
        batch_decode: bool = False,
        batch_max_rows: int = 16,
        protocol: str = "deltamem",
    ) -> None:
        self.default_mode = _check_mode(mode)
        self.protocol = check_choice("protocol", protocol, PROTOCOLS)
        if self.protocol == "authors":
            if self.default_mode != "online":
                raise InvalidOptionError("protocol", f"protocol='authors' runs in mode 'online' only (it continues "
                                         f"the session's KV cache as the authors' session does), got mode="
                                         f"{self.default_mode!r}")
            if batch_decode is True:
                raise InvalidOptionError("protocol", "protocol='authors' writes every generated token, and batched "
                                         "decode steps never write: use batch_decode=False")
        check_int("window_tokens", window_tokens, 0)
        check_int("max_message_tokens", max_message_tokens, 1)
        check_int("max_new_tokens", max_new_tokens, 0)
        check_int("kv_cache_bytes", kv_cache_bytes, 0)
        check_int("kv_cache_dir_bytes", kv_cache_dir_bytes, 0)
        check_int("max_messages_per_call", max_messages_per_call, 1)
        check_int("max_retries", max_retries, 0)
        if kv_tokens is not None:
            check_int("kv_tokens", kv_tokens, 64)
        if isinstance(kv_retain, bool) or not isinstance(kv_retain, int | float) or not 0 <= kv_retain < 1:
            raise InvalidOptionError("kv_retain", f"kv_retain must be in [0, 1), got {kv_retain!r}")
        history = check_choice("history", history, HISTORY_STYLES)
        on_divergence = check_choice("on_divergence", on_divergence, DIVERGENCE_POLICIES)
        if not isinstance(batch_decode, bool):
            raise TypeError(f"batch_decode must be True or False, got {batch_decode!r}")
        check_int("batch_max_rows", batch_max_rows, 1)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        self.window_tokens = window_tokens
        self.max_message_tokens = max_message_tokens
        self.max_new_tokens = max_new_tokens
        self.max_messages_per_call = max_messages_per_call
        self.sampling = sampling or DEFAULT_SAMPLING
        self.namespace = validate_identifier(namespace, "namespace")
        self.history = history
        self.on_divergence = on_divergence
        self.max_retries = max_retries

        self.model, self._tokenizer, self._model_name = resolve_model(model, adapter, tokenizer, device, dtype)
        self.model.eval()
        if self.protocol == "authors" and self.model.config.keeps_open_message:
            raise InvalidOptionError("protocol", "protocol='authors' with an SSW adapter needs ssw_semantics="
                                     "'official' (their message ids: -1 for system messages and the generation "
                                     "header, which our SSW semantics cannot express)")
        self.device = next(self.model.base_model.parameters()).device
        self.runner = ModelRunner(self.model, self.device)
        self.renderer = ChatRenderer(self._tokenizer)
        self._tool_format = detect_tool_format(self._tokenizer)
        if batch_decode and not model_can_batch(self.runner.new_cache()):
            logger.warning("batch_decode: this model's KV cache (%s) cannot be batched; sessions decode one "
                           "forward call at a time", type(self.runner.new_cache()).__name__)
            batch_decode = False
        self.batch_decode = batch_decode
        self._batcher = DecodeBatcher(self.runner, batch_max_rows) if batch_decode else None
        self._fingerprints = {
            "model": base_model_fingerprint(self.model.base_model),
            "adapter": adapter_fingerprint(self.model),
        }
        self.eos_ids = eos_token_ids(self.model.base_model, self._tokenizer)
        self.kv_tokens = min(kv_tokens or self.context_window, self.context_window)

        # A saved cache holds what its protocol ran (the authors' also holds the generated tokens' KV): files of
        # the other protocol are misses, never continued.
        self._kv_files = (KVCacheFiles(kv_cache_dir, kv_cache_dir_bytes, {**self._fingerprints,
                                                                          "protocol": self.protocol})
                          if kv_cache_dir is not None else None)
        self._kv_pool = KVCachePool(kv_cache_bytes, on_evict=self._save_evicted)
        online = AuthorsTurns if self.protocol == "authors" else OnlineTurns
        self._modes: dict[str, TurnMode] = {
            "online": online(self.runner, self.renderer, self.context_window, kv_tokens=self.kv_tokens,
                             retain=float(kv_retain), pool=self._kv_pool if kv_cache_bytes else None,
                             files=self._kv_files, cache_config=self.model.base_model.config),
            "windowed": WindowedTurns(self.runner, self.renderer, self.context_window, window_tokens),
            "state-only": StateOnlyTurns(self.runner, self.renderer, self.context_window, window_tokens),
        }

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
        """A short name of the base model (the embedded model's name, a directory's name, a hub id), never a path."""
        return self._model_name

    @property
    def context_window(self) -> int:
        cfg = self.model.base_model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(getattr(cfg, "max_position_embeddings", None) or 4096)

    @property
    def tool_call_format(self) -> ToolCallFormat | None:
        """How the chat template writes tool calls (:mod:`.tool_calls`), or ``None``: then replies are never
        parsed for calls, ``tools`` or not."""
        return self._tool_format

    @property
    def fingerprints(self) -> dict[str, str]:
        """``{"model": …, "adapter": …}``: what every session written by this engine is stamped with."""
        return dict(self._fingerprints)

    def kv_cache_stats(self) -> KVCacheStats:
        """Hot KV cache counters (hits, disk hits, misses, slides, evictions) and current size."""
        return self._kv_pool.stats

    def batch_stats(self) -> BatchStats | None:
        """Counters of batched decoding (steps, rows per step, sessions joined); ``None`` when it is off."""
        return self._batcher.stats if self._batcher is not None else None

    def close(self) -> None:
        """Save the hot KV caches to ``kv_cache_dir`` (if set) and close the store if the engine opened it."""
        if self._kv_files is not None:
            for key, context in self._kv_pool.drain():
                self._kv_files.save(key, context)
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
        """Copy a session (its snapshots up to ``turn``, default latest) to ``new_id``; the source is untouched.
        The fork starts without a hot KV cache (its first turn re-prefills)."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            return self.store.fork(session_id, new_id or uuid.uuid4().hex, namespace=ns,
                                   new_namespace=new_namespace, turn=turn)

    def rollback(self, session_id: str, turn: int, *, namespace: str | None = None) -> SessionInfo:
        """Go back to the snapshot after ``turn`` (later turns are dropped; so is the session's KV cache)."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            info = self.store.rollback(session_id, namespace=ns, turn=turn)
            self._forget_caches(ns, session_id)
            return info

    def reset(self, session_id: str, *, namespace: str | None = None) -> SessionInfo:
        """Forget everything: zero state, no record, no window, no snapshots, no KV cache (the id stays)."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            info = self.store.reset(session_id, namespace=ns)
            self._forget_caches(ns, session_id)
            return info

    def delete(self, session_id: str, *, namespace: str | None = None) -> None:
        """Delete the session with its state, snapshots, record, window and KV caches (in memory and on disk)."""
        ns = self._ns(namespace)
        with self._session_lock(ns, session_id):
            self.store.delete(session_id, namespace=ns)
            self._forget_caches(ns, session_id)

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
        data = self.store.load(session_id, namespace=ns, turn=turn, full_record=True)
        self._check_fingerprints(data.info)
        state = blobs_to_state(data.state, self.model)
        return export_session(path, data, state, self._fingerprints, self.model_name, self.model.config)

    def import_session(self, path: str | os.PathLike[str], session_id: str | None = None, *,
                       namespace: str | None = None) -> SessionInfo:
        """Create a session from an exported file (the file's id unless ``session_id`` is given) in ``namespace``
        (default: the engine's namespace) — never in the namespace the file was exported from.

        Raises :class:`FingerprintMismatchError` when the file was written with another model or adapter,
        :class:`InvalidStateError` for NaN/Inf or a foreign layout, :class:`PortableFormatError` for a file that
        fails its integrity check or is malformed, ``SessionExistsError`` when the id is taken; in every case
        nothing is created. The imported session has no KV cache: its first online turn
        re-prefills from the exported window.
        """
        from .portable import read_export
        from .serialization import check_state

        exported = read_export(path)
        fp = exported.fingerprints
        if fp.get("model") != self._fingerprints["model"] or fp.get("adapter") != self._fingerprints["adapter"]:
            raise FingerprintMismatchError(
                f"{path} was written with model {fp.get('model', '?')[:12]}… / adapter {fp.get('adapter', '?')[:12]}…; "
                f"this engine runs model {self._fingerprints['model'][:12]}… / adapter "
                f"{self._fingerprints['adapter'][:12]}…"
            )
        check_state(exported.state, self.model)
        ns = self._ns(namespace)  # the caller's tenant, whatever the file says
        sid = session_id or exported.session_id
        with self._session_lock(ns, sid):
            info = self.store.create(sid, namespace=ns, model_fingerprint=fp["model"],
                                     adapter_fingerprint=fp["adapter"], metadata=exported.metadata)
            self._forget_caches(ns, sid)  # a cache file of an earlier session with this id must not apply
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
        on_divergence: str | None = None,
        expected_version: int | None = None,
        create_if_missing: bool = True,
    ) -> WriteResult:
        """Write messages into the session's state without generating (idempotent: see ``docs/engine.md``).
        Options as :meth:`stream`."""
        call = self._call(session_id, namespace, history, on_divergence, expected_version, create_if_missing)
        mode_ = self._call_mode(mode)
        msgs, counts = self._validate(messages)
        runner = self._modes[mode_]
        with self._session_lock(call.namespace, session_id):
            prep = self._prepare(call, msgs, counts)
            if not prep.plan.new and not prep.plan.replayed:
                return WriteResult(session_id, call.namespace, prep.data.info.turn, 0, 0,
                                   version=prep.data.info.version or None)
            work = runner.begin((call.namespace, session_id), prep, None)
            try:
                runner.write_new(work)
                info, work = self._commit(runner, work, prep.plan.history, msgs, counts, call)
            except BaseException:
                runner.abandon(work)
                raise
        plan = work.prep.plan  # the plan that was committed (planned again after a concurrent commit)
        return WriteResult(
            session_id, call.namespace, info.turn, len(work.written), sum(w.tokens for w in work.written),
            plan.replayed, plan.base_turn if plan.replayed else None, version=info.version,
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
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = _UNSET,
        repetition_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        tools: Any = None,
        history: str | None = None,
        on_divergence: str | None = None,
        expected_version: int | None = None,
        create_if_missing: bool = True,
        _cancelled: threading.Event | None = None,
    ) -> Iterator[ChatChunk]:
        """Stream the answer as text deltas; the last chunk carries ``finish_reason``, ``usage`` and ``result``.

        Generation options left as ``None`` take the engine's defaults (``max_new_tokens``, ``sampling``);
        ``temperature=0`` is greedy and deterministic. ``history`` (``"auto"``, ``"full"``, ``"append"``) says
        how the messages relate to what the session holds, ``on_divergence`` (``"reject"``, ``"rollback"``)
        what a diverging history does, ``expected_version`` (the session version the caller last saw) makes
        the call conditional: if the session moved past it, :class:`HistoryConflictError`.

        Messages and options are validated here, eagerly (before the first ``next()``): a refused option is an
        :class:`InvalidOptionError`, a refused message an :class:`InvalidMessageError`, and nothing is created.
        The turn is committed when the last chunk is produced; a stream closed early commits nothing (nothing
        is written, the session is unchanged, a new session is not created). The session stays locked while the
        stream is open.
        """
        call = self._call(session_id, namespace, history, on_divergence, expected_version, create_if_missing)
        mode_ = self._call_mode(mode)
        if max_new_tokens is None:
            max_new_tokens = self.max_new_tokens
        check_max_new_tokens(max_new_tokens, self.context_window)
        stops = check_stop(stop)
        tools = check_tools(tools)
        d = self.sampling
        params = SamplingParams(
            d.temperature if temperature is None else temperature,
            d.top_p if top_p is None else top_p,
            d.top_k if top_k is _UNSET else top_k,
            seed,
            d.repetition_penalty if repetition_penalty is None else repetition_penalty,
        )
        gen = GenOptions(max_new_tokens, params, stops, tools)
        msgs, counts = self._validate(messages)
        return self._stream(call, mode_, msgs, counts, gen, _cancelled)

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
    def _call_mode(self, mode: str | None) -> str:
        mode_ = _check_mode(mode or self.default_mode)
        if self.protocol == "authors" and mode_ != "online":
            raise InvalidOptionError("mode", f"this engine runs protocol='authors', which is defined for mode "
                                     f"'online' only; got mode={mode_!r}")
        return mode_

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

    def _forget_caches(self, ns: str, session_id: str) -> None:
        for runner in self._modes.values():
            runner.forget((ns, session_id))

    def _save_evicted(self, key: tuple[str, str], context: Any) -> None:
        if self._kv_files is not None:
            self._kv_files.save(key, context)

    def _call(self, session_id: Any, namespace: str | None, history: str | None, on_divergence: str | None,
              expected_version: Any, create_if_missing: Any) -> _Call:
        """Validate what a call asks of its session (before anything is loaded or created)."""
        if expected_version is not None:
            check_int("expected_version", expected_version, 0)
        return _Call(
            validate_identifier(session_id, "session id"), self._ns(namespace),
            _check_style(self.history if history is None else history),
            check_choice("on_divergence", self.on_divergence if on_divergence is None else on_divergence,
                         DIVERGENCE_POLICIES),
            expected_version, check_bool("create_if_missing", create_if_missing),
        )

    def _validate(self, messages: Any) -> tuple[list[Message], list[int]]:
        limit = self.max_messages_per_call
        if isinstance(messages, list | tuple) and len(messages) > limit:  # before looking at any of them
            raise TooManyMessagesError(f"{len(messages)} messages in one call, more than max_messages_per_call="
                                       f"{limit}")
        msgs = normalize_messages(messages)
        if not msgs:
            raise InvalidMessageError("no messages given")
        if len(msgs) > limit:
            raise TooManyMessagesError(f"{len(msgs)} messages in one call, more than max_messages_per_call={limit}")
        counts = []
        for i, m in enumerate(msgs):
            n = len(self.renderer.message_ids(m))
            if n > self.max_message_tokens:
                raise MessageTooLongError(
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

    def _load(self, call: _Call) -> SessionData:
        """The latest snapshot. A missing session (with ``create_if_missing``) is the fresh session, version 0,
        **not created**: the call's commit creates it, so a call that fails before its commit leaves nothing."""
        try:
            data = self.store.load(call.session_id, namespace=call.namespace)
        except SessionNotFoundError:
            if not call.create_if_missing:
                raise
            now = datetime.now(UTC)
            info = SessionInfo(call.session_id, call.namespace, self._fingerprints["model"],
                               self._fingerprints["adapter"], 0, 0, now, now)
            return SessionData(info, 0, [], [], [])
        self._check_fingerprints(data.info)
        return data

    def _prepare(self, call: _Call, msgs: list[Message], counts: list[int]) -> Prepared:
        """Load and plan; a record that changed while it was being read is planned again (bounded)."""
        attempt = 0
        while True:
            try:
                return self._plan(call, msgs, counts)
            except HistoryConflictError:
                raise
            except ConcurrentUpdateError:
                attempt += 1
                if attempt > self.max_retries:
                    raise
                logger.info("session %s/%s changed while planning; planning again (attempt %d)",
                            call.namespace, call.session_id, attempt)

    def _plan(self, call: _Call, msgs: list[Message], counts: list[int]) -> Prepared:
        """One load and plan of ``msgs`` against the session as committed now (see :mod:`.session`). Raises
        :class:`HistoryConflictError` before anything is generated or written when the history diverges under
        ``on_divergence="reject"``, or the session is not at ``expected_version``."""
        session_id, ns = call.session_id, call.namespace
        data = self._load(call)
        plan = plan_turn(call.style, msgs, counts, data.record,
                         lambda: self.store.list_turns(session_id, namespace=ns), data.info.turn, data.window,
                         full_record=lambda: self.store.load(session_id, namespace=ns, turn=data.turn,
                                                             full_record=True).written,
                         on_divergence=call.on_divergence)
        if call.expected_version is not None and data.info.version != call.expected_version:
            raise self._conflict(call, data, plan, moved=True)
        if plan.conflict:
            raise self._conflict(call, data, plan)
        if plan.base_turn == data.turn:
            blobs = data.state
        elif plan.base_turn >= 0:  # a replay: the snapshot before the divergence
            blobs = self.store.load(session_id, namespace=ns, turn=plan.base_turn).state
        else:
            blobs = []
        # Deserialise (and check finiteness / layout) before anything is generated or written.
        return Prepared(data, plan, blobs_to_state(blobs, self.model))

    @staticmethod
    def _conflict(call: _Call, data: SessionData, plan: TurnPlan, *, moved: bool = False,
                  version: int | None = None) -> HistoryConflictError:
        info, n = data.info, plan.committed
        version = info.version if version is None else version
        agreed = plan.diverged_at if plan.diverged_at is not None else n
        where = f"session {info.namespace}/{info.session_id} (version {version})"
        if moved:
            reason = (f"{where} is not at expected_version={call.expected_version}: it changed since the caller "
                      "last saw it")
        else:
            reason = (f"{where} holds {n - agreed} committed message(s) that this call's history does not have at "
                      f"their position (the history agrees with the first {agreed} of {n}): another client wrote "
                      "to the session after this caller's last view, or the history was edited or cut")
        advice = ("reload the session and send the call again" if moved else "reload the session, send only the "
                  "new messages (history='append'), or pass on_divergence='rollback' to replace what it holds")
        return HistoryConflictError(
            f"{reason}; nothing was written: {advice}",
            namespace=info.namespace, session_id=info.session_id, version=version, common_prefix=agreed,
            missing=n - agreed, expected_version=call.expected_version,
        )

    def _full_context_tokens(self, prep: Prepared) -> int:
        plan = prep.plan
        earlier = plan.base_tokens
        new = sum(i.tokens for i in plan.new)
        first = plan.history[0] if plan.history and plan.history[0].index == 0 else None
        # what the template puts before the first message (SmolLM2: a default system prompt)
        head = len(self.renderer.continuation_ids([], [first.message])) if first is not None else 0
        return head + earlier + new + len(self.renderer.generation_header_ids)

    def _stream(self, call: _Call, mode: str, msgs: list[Message], counts: list[int], gen: GenOptions,
                cancelled: threading.Event | None) -> Iterator[ChatChunk]:
        runner = self._modes[mode]
        session_id, ns = call.session_id, call.namespace
        with self._session_lock(ns, session_id):
            prep = self._prepare(call, msgs, counts)
            plan = prep.plan
            work = runner.begin((ns, session_id), prep, gen)
            try:
                prompt = runner.prompt(work, gen)
                final = None
                # closing() ends a batched generation (it leaves the batch) before the turn is abandoned
                with contextlib.closing(generate(
                    self.runner, prompt.read_state, prompt.cache, prompt.tail, max_new_tokens=gen.max_new_tokens,
                    params=gen.params, eos_ids=self.eos_ids, stop=gen.stop, tokenizer=self._tokenizer,
                    cancelled=cancelled, batcher=None if prompt.writes else self._batcher, writes=prompt.writes,
                    prompt_segments=prompt.segment_ids, reply_segment=prompt.reply_segment,
                )) as events:
                    for event in events:
                        if event.finish_reason is None:
                            yield ChatChunk(event.text, session_id)
                        else:
                            final = event
                assert final is not None
                if final.finish_reason == "cancelled":
                    runner.abandon(work)
                    return
                parsed = self._parse_reply(final.full_text, gen.tools)
                reply = self._reply_message(final.full_text, parsed)
                reply_item = HistoryItem(plan.history[-1].index + 1, reply, len(self.renderer.message_ids(reply)))
                runner.write_reply(work, prompt, reply_item, final)
                info, work = self._commit(runner, work, [*plan.history, reply_item], [*msgs, reply],
                                          [*counts, reply_item.tokens], call)
            except BaseException:  # an error, or the stream closed early (GeneratorExit): nothing is kept
                runner.abandon(work)
                raise
            committed = work.prep.plan  # the plan that was committed (planned again after a concurrent commit)
            usage = Usage(
                prompt_tokens=prompt.prompt_tokens,
                completion_tokens=final.tokens,
                written_tokens=sum(w.tokens for w in work.written),
                full_context_tokens=self._full_context_tokens(work.prep),
                cached_tokens=prompt.cached_tokens,
            )
            finish = "tool_calls" if parsed.tool_calls and final.finish_reason == "stop" else final.finish_reason
            result = ChatResult(
                text=final.full_text, finish_reason=finish, usage=usage, session_id=session_id,
                namespace=ns, turn=info.turn, replayed=committed.replayed,
                rolled_back_to=committed.base_turn if committed.replayed else None,
                written_messages=len(work.written), mode=mode, kv_cache=work.kv, content=parsed.content,
                tool_calls=parsed.tool_calls, version=info.version,
            )
        yield ChatChunk(final.text, session_id, finish_reason=finish, usage=usage, result=result)

    def _parse_reply(self, text: str, tools: Any) -> ParsedReply:
        """Tool calls in the reply: only when tools were offered and the template has a call format."""
        if not tools or self._tool_format is None:
            return ParsedReply(text)
        return self._tool_format.parse(text, tools)

    @staticmethod
    def _reply_message(text: str, parsed: ParsedReply) -> Message:
        """The reply as it is written: with calls, as the assistant message a client sends back (its content and
        ``tool_calls``), so that the resent copy is recognised and the template renders the calls its own way."""
        if not parsed.tool_calls:
            return Message("assistant", text)
        return normalize_message({"role": "assistant", "content": parsed.content or "",
                                  "tool_calls": [c.to_openai() for c in parsed.tool_calls]})

    def _commit(self, runner: TurnMode, work: TurnWork, history: list[HistoryItem], all_msgs: list[Message],
                all_counts: list[int], call: _Call) -> tuple[SessionInfo, TurnWork]:
        """Commit a turn. When another writer committed first (the store's optimistic version), plan the call
        again — ``all_msgs`` (the call's messages and the reply) with the same rules — against what is committed
        now, write it and commit again, up to ``max_retries`` times: an append follows the other writer's
        messages, a full history that now diverges is a :class:`HistoryConflictError` (or, with
        ``on_divergence="rollback"``, a replay that the result reports). With ``expected_version`` nothing is
        planned again: the session moved past it, a conflict. Returns the committed header and the committed
        work (its ``prep.plan`` is what was done)."""
        attempt = 0
        while True:
            blobs = state_to_blobs(work.state)
            window = runner.window(work, history)
            try:
                info = self._store_turn(call, work.prep, blobs, work.written, window)
            except ConcurrentUpdateError as exc:
                runner.abandon(work)
                if call.expected_version is not None:  # the session moved past the version the caller saw
                    try:
                        now = self.store.get(call.session_id, namespace=call.namespace).version
                    except Exception:  # noqa: BLE001 - only used for the error's details
                        now = work.prep.data.info.version
                    raise self._conflict(call, work.prep.data, work.prep.plan, moved=True, version=now) from exc
                lost = exc
            else:
                runner.committed(work, info, blobs)
                return info, work
            prep = None
            while prep is None:
                attempt += 1
                if attempt > self.max_retries:
                    raise lost
                logger.info("session %s/%s changed concurrently; planning and writing again (attempt %d)",
                            call.namespace, call.session_id, attempt)
                try:
                    prep = self._plan(call, all_msgs, all_counts)
                except HistoryConflictError:
                    raise
                except ConcurrentUpdateError as exc:  # changed again while planning: one more attempt
                    lost = exc
            if not prep.plan.new and not prep.plan.replayed:
                return prep.data.info, TurnWork(work.key, prep, prep.state)
            work = runner.begin(work.key, prep, None)
            runner.write_new(work)
            history = prep.plan.history

    def _store_turn(self, call: _Call, prep: Prepared, blobs: list, written: list, window: list) -> SessionInfo:
        """The store transactions of a commit: create the session first when the call found none (its version
        0); a replay from nothing resets first. A session this call created is deleted again when its commit
        fails for any reason but a concurrent update (then another writer's turn is in it)."""
        session_id, ns = call.session_id, call.namespace
        version, base_turn = prep.data.info.version, prep.plan.base_turn
        created = False
        if version == 0:
            try:
                version = self.create_session(session_id, namespace=ns).version
            except SessionExistsError as exc:  # created meanwhile by another writer: plan against it
                raise ConcurrentUpdateError(f"session {ns}/{session_id} was created by another writer") from exc
            created = True
        try:
            if base_turn < 0:  # replay from nothing: every old-enough snapshot was pruned
                version = self.store.reset(session_id, namespace=ns, expected_version=version).version
                base_turn = 0
            return self.store.commit(session_id, namespace=ns, expected_version=version, state=blobs,
                                     written=written, window=window, base_turn=base_turn)
        except ConcurrentUpdateError:
            raise
        except BaseException:
            if created:
                with contextlib.suppress(Exception):
                    self.store.delete(session_id, namespace=ns)
            raise


# ---------------------------------------------------------------------------------------------- helpers
def _check_mode(mode: str) -> str:
    return check_choice("mode", mode, MODES, _MODE_ALIASES)


def _check_style(style: str) -> str:
    return check_choice("history", style, HISTORY_STYLES)
