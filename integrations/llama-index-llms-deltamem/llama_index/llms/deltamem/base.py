"""`DeltaMemLLM`: a LlamaIndex LLM whose conversations are δ-mem sessions.

Which session a call belongs to, first match wins:

1. the call's ``session_id`` keyword (``llm.chat(messages, session_id="s")``);
2. a per-session view: ``llm.for_session("s")`` returns a copy bound to ``"s"`` (it shares the engine);
3. the context variable set by ``with session_scope("s"):`` (it follows asyncio tasks created inside the block,
   so ``with session_scope("s"): handler = agent.run(...)`` routes every LLM call of that run);
4. the ``session_id`` field;
5. none of these: a throwaway session, deleted after the call (stateless).

LlamaIndex chat engines and agents resend the whole history on every call; the engine writes only what it has
not written yet (idempotent writes) and rolls back and replays when an earlier message changed.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM

from deltamem_agents import MemoryEngine

__all__ = ["EMBEDDED_MODEL_NAME", "DeltaMemLLM", "clear_engines", "current_session", "get_engine", "session_scope"]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("deltamem_session", default=None)
_ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant",
    "chatbot": "assistant", "tool": "tool", "function": "tool",
}


# ---------------------------------------------------------------------------------------------- sessions
@contextlib.contextmanager
def session_scope(session_id: str) -> Iterator[str]:
    """Route the LLM calls made inside the block (and in asyncio tasks created inside it) to ``session_id``."""
    token = _SESSION.set(session_id)
    try:
        yield session_id
    finally:
        _SESSION.reset(token)


def current_session() -> str | None:
    """The session set by the innermost :func:`session_scope`, if any."""
    return _SESSION.get()


# ---------------------------------------------------------------------------------------------- engines
_ENGINES: dict[tuple[Any, ...], MemoryEngine] = {}
_LOCK = threading.Lock()


def get_engine(model: str | None = None, *, adapter: str | None = None, store: Any = None,
               window_tokens: int = 1024) -> MemoryEngine:
    """The process-wide engine for ``(model, adapter, store, window_tokens)``, created on first use."""
    store_key = store if store is None or isinstance(store, str | os.PathLike) else ("object", id(store))
    key = (model, adapter, store_key, window_tokens)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = MemoryEngine(model, adapter=adapter, store=store, window_tokens=window_tokens)
            _ENGINES[key] = engine
        return engine


def clear_engines(*, close: bool = True) -> None:
    """Forget every shared engine (closing the stores they opened unless ``close=False``)."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    if close:
        for engine in engines:
            engine.close()


# ---------------------------------------------------------------------------------------------- messages
def to_engine_message(message: ChatMessage) -> dict[str, Any]:
    """A LlamaIndex ``ChatMessage`` as the engine's message dict (text only; ``name``, ``tool_calls`` and
    ``tool_call_id`` from ``additional_kwargs`` are kept)."""
    role_value = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    role = _ROLES.get(role_value)
    if role is None:
        raise ValueError(f"unsupported message role {role_value!r}")
    parts: list[str] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif role != "assistant":  # assistant messages may carry thinking / tool-call blocks: not text
            raise ValueError(f"DeltaMemLLM accepts text only; got a {type(block).__name__} in a {role} message")
    out: dict[str, Any] = {"role": role, "content": "".join(parts)}
    extra = message.additional_kwargs or {}
    for key in ("name", "tool_calls", "tool_call_id"):
        if extra.get(key):
            out[key] = extra[key]
    return out


# ---------------------------------------------------------------------------------------------- the LLM
class DeltaMemLLM(LLM):
    """LlamaIndex LLM backed by a δ-mem :class:`~deltamem_agents.MemoryEngine`.

    Every call is a turn of a session (see the module docstring for which): the session's state is read while
    answering, and the call's new messages and the reply are written into it. ``complete(prompt)`` is a chat turn
    with one user message (the chat template is always applied; ``formatted`` is ignored).

    Engines are shared: instances naming the same ``(model, adapter, store, window_tokens)`` use one engine,
    loaded on first use. Pass ``engine=`` to use your own.
    """

    model: str | None = Field(default=None, description="Base model: None (embedded SmolLM2-135M-Instruct), "
                              "a local directory, GGUF file or hub id.")
    adapter: str | None = Field(default=None, description="δ-mem adapter: None (shipped), a directory, or 'none'.")
    store: str | None = Field(default=None, description="Session store URL; None is SQLite in the user's cache.")
    window_tokens: int = Field(default=1024, description="Tokens of recent history kept as text (windowed mode).")
    engine: Any = Field(default=None, exclude=True, description="A MemoryEngine to use instead of the shared one.")
    session_id: str | None = Field(default=None, description="Default session (after kwarg, view and scope).")
    namespace: str | None = Field(default=None, description="Namespace (tenant) of the sessions.")
    mode: Literal["windowed", "online", "state-only"] | None = Field(default=None, description="Engine mode.")
    history: Literal["auto", "full", "append"] = Field(default="auto", description="History reconciliation.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    max_new_tokens: int = Field(default=256, ge=0, description="Most tokens generated per call.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None)
    stop: list[str] | None = Field(default=None, description="Stop strings (cut from the reply).")

    _engine: Any = PrivateAttr(default=None)
    _bound_session: str | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "DeltaMemLLM"

    # ------------------------------------------------------------------------------------------ engine
    def get_engine(self) -> MemoryEngine:
        """The engine this LLM runs on (loaded on first use)."""
        if self.engine is not None:
            return self.engine
        if self._engine is None:
            self._engine = get_engine(self.model, adapter=self.adapter, store=self.store,
                                      window_tokens=self.window_tokens)
        return self._engine

    @property
    def model_name(self) -> str:
        if self.model is not None:
            return str(self.model)
        if self.engine is not None:
            return str(getattr(self.engine, "model_name", EMBEDDED_MODEL_NAME))
        return EMBEDDED_MODEL_NAME

    @property
    def metadata(self) -> LLMMetadata:
        """Context window from the engine (loads it); a chat model; no function calling (the embedded model's
        template does not render tools, and this class does not implement LlamaIndex's tool-call protocol)."""
        return LLMMetadata(
            context_window=self.get_engine().context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.model_name,
            system_role=MessageRole.SYSTEM,
        )

    # ------------------------------------------------------------------------------------------ sessions
    def for_session(self, session_id: str, *, namespace: str | None = None) -> DeltaMemLLM:
        """A copy of this LLM bound to ``session_id`` (and ``namespace``); it shares the engine."""
        view = self.model_copy(update={} if namespace is None else {"namespace": namespace})
        view._engine = self._engine
        view._bound_session = session_id
        return view

    def resolve_session(self, session_id: str | None = None) -> str | None:
        """The session a call would use (``None``: a throwaway session)."""
        return session_id or self._bound_session or _SESSION.get() or self.session_id

    # ------------------------------------------------------------------------------------------ a call
    def _call_args(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> tuple[Any, str, bool,
                                                                                        list[dict], dict[str, Any]]:
        engine = self.get_engine()
        session = self.resolve_session(kwargs.pop("session_id", None))
        ephemeral = session is None
        if ephemeral:
            session = f"ephemeral-{uuid.uuid4().hex}"
        stop = kwargs.pop("stop", None)
        options = {
            "namespace": kwargs.pop("namespace", self.namespace),
            "mode": kwargs.pop("mode", self.mode),
            "history": "full" if ephemeral else kwargs.pop("history", self.history),
            "max_new_tokens": int(kwargs.pop("max_new_tokens", kwargs.pop("max_tokens", self.max_new_tokens))),
            "temperature": float(kwargs.pop("temperature", self.temperature)),
            "top_p": float(kwargs.pop("top_p", self.top_p)),
            "top_k": kwargs.pop("top_k", self.top_k),
            "seed": kwargs.pop("seed", self.seed),
            "stop": list(stop if stop is not None else (self.stop or [])),
        }
        kwargs.pop("history", None)
        if kwargs:
            logger.debug("DeltaMemLLM ignores call arguments %s", sorted(kwargs))
        return engine, session, ephemeral, [to_engine_message(m) for m in messages], options

    @staticmethod
    def _cleanup(engine: Any, session: str, ephemeral: bool, namespace: str | None) -> None:
        if ephemeral:
            with contextlib.suppress(Exception):
                engine.delete(session, namespace=namespace)

    def _raw(self, result: Any, ephemeral: bool) -> dict[str, Any]:
        usage = result.usage
        return {
            "model_name": self.model_name,
            "finish_reason": result.finish_reason,
            "session_id": None if ephemeral else result.session_id,
            "namespace": result.namespace,
            "turn": None if ephemeral else result.turn,
            "replayed": result.replayed,
            "mode": result.mode,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "written_tokens": usage.written_tokens,
                "full_context_tokens": usage.full_context_tokens,
            },
        }

    def _stream_chat_iter(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Iterator[ChatResponse]:
        """Resolve the session and validate the messages now (eagerly: a stream consumed after leaving a
        ``session_scope`` still goes to the scope's session), then return the stream."""
        engine, session, ephemeral, msgs, options = self._call_args(messages, dict(kwargs))
        iterator = engine.stream(session, msgs, **options)
        return self._responses(iterator, engine, session, ephemeral, options)

    def _responses(self, iterator: Iterator[Any], engine: Any, session: str, ephemeral: bool,
                   options: dict[str, Any]) -> Iterator[ChatResponse]:
        text = ""
        try:
            for chunk in iterator:
                text += chunk.text
                raw = self._raw(chunk.result, ephemeral) if chunk.result is not None else None
                if chunk.result is None and not chunk.text:
                    continue
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=chunk.text,
                                   raw=raw, additional_kwargs=dict(raw["usage"]) if raw else {})
        finally:
            iterator.close()
            self._cleanup(engine, session, ephemeral, options["namespace"])

    def _astream_chat_iter(self, messages: Sequence[ChatMessage],
                           kwargs: dict[str, Any]) -> AsyncIterator[ChatResponse]:
        """As :meth:`_stream_chat_iter` (eager session resolution), over the engine's async stream."""
        engine, session, ephemeral, msgs, options = self._call_args(messages, dict(kwargs))
        return self._aresponses(engine.astream(session, msgs, **options), engine, session, ephemeral, options)

    async def _aresponses(self, iterator: AsyncIterator[Any], engine: Any, session: str, ephemeral: bool,
                          options: dict[str, Any]) -> AsyncIterator[ChatResponse]:
        text = ""
        try:
            async for chunk in iterator:
                text += chunk.text
                raw = self._raw(chunk.result, ephemeral) if chunk.result is not None else None
                if chunk.result is None and not chunk.text:
                    continue
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=chunk.text,
                                   raw=raw, additional_kwargs=dict(raw["usage"]) if raw else {})
        finally:
            await iterator.aclose()
            self._cleanup(engine, session, ephemeral, options["namespace"])

    # ------------------------------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = None
        for last in self._stream_chat_iter(messages, kwargs):  # noqa: B007 - the last response is the whole one
            pass
        assert last is not None
        return ChatResponse(message=last.message, raw=last.raw, additional_kwargs=last.additional_kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat_iter(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = None
        async for last in self._astream_chat_iter(messages, kwargs):  # noqa: B007
            pass
        assert last is not None
        return ChatResponse(message=last.message, raw=last.raw, additional_kwargs=last.additional_kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return self._astream_chat_iter(messages, kwargs)

    # ------------------------------------------------------------------------------------------ complete
    @staticmethod
    def _as_messages(prompt: str) -> list[ChatMessage]:
        return [ChatMessage(role=MessageRole.USER, content=prompt)]

    @staticmethod
    def _completion(response: ChatResponse) -> CompletionResponse:
        return CompletionResponse(text=response.message.content or "", delta=response.delta, raw=response.raw,
                                  additional_kwargs=response.additional_kwargs)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._completion(self.chat(self._as_messages(prompt), **kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        responses = self._stream_chat_iter(self._as_messages(prompt), kwargs)

        def gen() -> CompletionResponseGen:
            for response in responses:
                yield self._completion(response)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._completion(await self.achat(self._as_messages(prompt), **kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        responses = self._astream_chat_iter(self._as_messages(prompt), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for response in responses:
                yield self._completion(response)

        return gen()
