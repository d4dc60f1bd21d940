"""`DeltaMemLLM`: a LlamaIndex LLM whose conversations are δ-mem sessions.

Which session a call belongs to, first match wins:

1. the call's ``session_id`` keyword (``llm.chat(messages, session_id="s")``);
2. a per-session view: ``llm.for_session("s")`` returns a copy bound to ``"s"`` (it shares the engine);
3. the context variable set by ``with session_scope("s"):`` (it follows asyncio tasks created inside the block,
   so ``with session_scope("s"): handler = agent.run(...)`` routes every LLM call of that run);
4. the ``session_id`` field;
5. none of these: a throwaway session on the engine's twin, with a private in-memory store, deleted after the
   call (stateless; nothing reaches the session store).

LlamaIndex chat engines and agents resend the whole history on every call; the engine writes only what it has
not written yet (idempotent writes) and rolls back and replays when an earlier message changed.

Engines, throwaway sessions, generation defaults, result metadata and message rules come from the integration
core shared with the LangChain package (:mod:`deltamem_agents.integrations`); this module adapts them to
LlamaIndex.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

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

from deltamem_agents.integrations import (
    EMBEDDED_MODEL_NAME,
    GenerationDefaults,
    SessionTarget,
    clear_engines,
    engine_message,
    engine_role,
    generation_options,
    get_engine,
    result_metadata,
    served_model_name,
    text_from_parts,
)

if TYPE_CHECKING:
    from deltamem_agents import MemoryEngine

__all__ = ["EMBEDDED_MODEL_NAME", "DeltaMemLLM", "clear_engines", "current_session", "get_engine", "session_scope"]

logger = logging.getLogger(__name__)

_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("deltamem_session", default=None)


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


# ---------------------------------------------------------------------------------------------- messages
def to_engine_message(message: ChatMessage) -> dict[str, Any]:
    """A LlamaIndex ``ChatMessage`` as the engine's message dict (text only: an image, audio or document block
    raises :class:`~deltamem_agents.engine.InvalidMessageError`, a ``ValueError``; ``name``, ``tool_calls``
    and ``tool_call_id`` from ``additional_kwargs`` are kept)."""
    role_value = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    role = engine_role(role_value)
    parts = [("text", b.text) if isinstance(b, TextBlock) else (type(b).__name__, None) for b in message.blocks]
    extra = message.additional_kwargs or {}
    return engine_message(role, text_from_parts(parts, role=role, owner="DeltaMemLLM"), name=extra.get("name"),
                          tool_calls=extra.get("tool_calls"), tool_call_id=extra.get("tool_call_id"))


# ---------------------------------------------------------------------------------------------- the LLM
class DeltaMemLLM(LLM):
    """LlamaIndex LLM backed by a δ-mem :class:`~deltamem_agents.MemoryEngine`.

    Every call is a turn of a session (see the module docstring for which): the session's state is read while
    answering, and the call's new messages and the reply are written into it. ``complete(prompt)`` is a chat turn
    with one user message (the chat template is always applied; ``formatted`` is ignored).

    Engines are shared: instances naming the same ``(model, adapter, store, window_tokens)`` — and LangChain's
    ``ChatDeltaMem`` in the same process — use one engine, loaded on first use. Pass ``engine=`` to use your own.

    Generation options left ``None`` take the engine's defaults (``temperature`` 0.2, ``top_p`` 0.9,
    ``repetition_penalty`` 1.1, 512 new tokens unless the engine was built otherwise); a value set here or per
    call wins.
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
    on_divergence: Literal["reject", "rollback"] | None = Field(
        default=None, description="A history that diverges from the session's: 'reject' (HistoryConflictError, "
        "nothing written) or 'rollback' (replay it). None: the engine's default ('reject').")
    temperature: float | None = Field(default=None, ge=0.0,
                                      description="Sampling temperature; 0 is greedy. None: the engine's (0.2).")
    max_new_tokens: int | None = Field(default=None, ge=0,
                                       description="Most tokens generated per call. None: the engine's (512).")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling. None: the engine's.")
    top_k: int | None = Field(default=None, ge=1, description="Top-k sampling. None: the engine's (none).")
    repetition_penalty: float | None = Field(default=None, gt=0.0,
                                             description="Penalty on tokens already generated in the reply; "
                                             "None: the engine's (1.1); 1.0 turns it off.")
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
        """The model's name as the engine reports it (nothing is loaded for it)."""
        return served_model_name(self.model, self.engine if self.engine is not None else self._engine)

    def generation_defaults(self) -> GenerationDefaults:
        """What the engine uses for an option left ``None`` (a ``MemoryEngine``'s defaults until it exists)."""
        return GenerationDefaults.of(self.engine if self.engine is not None else self._engine)

    @property
    def metadata(self) -> LLMMetadata:
        """Context window from the engine (loads it); a chat model; no function calling (the embedded model's
        template does not render tools, and this class does not implement LlamaIndex's tool-call protocol)."""
        engine = self.get_engine()
        num_output = self.max_new_tokens if self.max_new_tokens is not None else GenerationDefaults.of(
            engine).max_new_tokens
        return LLMMetadata(
            context_window=engine.context_window,
            num_output=num_output,
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
    def _call_args(self, messages: Sequence[ChatMessage],
                   kwargs: dict[str, Any]) -> tuple[SessionTarget, list[dict[str, Any]], dict[str, Any]]:
        engine = self.get_engine()
        msgs = [to_engine_message(m) for m in messages]  # refused before a throwaway session is set up
        target = SessionTarget.resolve(engine, self.resolve_session(kwargs.pop("session_id", None)),
                                       kwargs.pop("namespace", self.namespace))
        stop = kwargs.pop("stop", None)
        max_new = kwargs.pop("max_new_tokens", None)
        max_new = kwargs.pop("max_tokens", None) if max_new is None else max_new
        options = {
            **target.call_options(kwargs.pop("history", self.history),
                                  kwargs.pop("on_divergence", self.on_divergence)),
            "mode": kwargs.pop("mode", self.mode),
            **generation_options(
                max_new_tokens=max_new if max_new is not None else self.max_new_tokens,
                temperature=kwargs.pop("temperature", self.temperature),
                top_p=kwargs.pop("top_p", self.top_p),
                top_k=kwargs.pop("top_k", self.top_k),
                repetition_penalty=kwargs.pop("repetition_penalty", self.repetition_penalty),
                seed=kwargs.pop("seed", self.seed),
                stop=list(stop) if stop is not None else (list(self.stop) if self.stop else None),
            ),
        }
        kwargs.pop("max_tokens", None)
        if kwargs:
            logger.debug("DeltaMemLLM ignores call arguments %s", sorted(kwargs))
        return target, msgs, options

    def _raw(self, target: SessionTarget, result: Any, version: int | None) -> dict[str, Any]:
        return result_metadata(result, model_name=self.model_name, ephemeral=target.ephemeral, version=version)

    def _stream_chat_iter(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Iterator[ChatResponse]:
        """Resolve the session and validate the messages now (eagerly: a stream consumed after leaving a
        ``session_scope`` still goes to the scope's session), then return the stream."""
        target, msgs, options = self._call_args(messages, dict(kwargs))
        try:
            iterator = target.engine.stream(target.session_id, msgs, **options)
        except BaseException:
            target.discard()
            raise
        return self._responses(iterator, target)

    def _responses(self, iterator: Iterator[Any], target: SessionTarget) -> Iterator[ChatResponse]:
        text = ""
        try:
            for chunk in iterator:
                text += chunk.text
                if chunk.result is None and not chunk.text:
                    continue
                raw = self._raw(target, chunk.result, target.version(chunk.result)) if chunk.result else None
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=chunk.text,
                                   raw=raw, additional_kwargs=dict(raw["usage"]) if raw else {})
        finally:
            iterator.close()
            target.discard()

    def _astream_chat_iter(self, messages: Sequence[ChatMessage],
                           kwargs: dict[str, Any]) -> AsyncIterator[ChatResponse]:
        """As :meth:`_stream_chat_iter` (eager session resolution), over the engine's async stream."""
        target, msgs, options = self._call_args(messages, dict(kwargs))
        return self._aresponses(target.engine.astream(target.session_id, msgs, **options), target)

    async def _aresponses(self, iterator: AsyncIterator[Any], target: SessionTarget) -> AsyncIterator[ChatResponse]:
        text = ""
        try:
            async for chunk in iterator:
                text += chunk.text
                if chunk.result is None and not chunk.text:
                    continue
                raw = None
                if chunk.result is not None:
                    version = await asyncio.to_thread(target.version, chunk.result)  # a store read
                    raw = self._raw(target, chunk.result, version)
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=chunk.text,
                                   raw=raw, additional_kwargs=dict(raw["usage"]) if raw else {})
        finally:
            await iterator.aclose()
            target.discard()

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
