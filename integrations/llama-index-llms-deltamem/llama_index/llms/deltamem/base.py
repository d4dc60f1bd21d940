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

Tool calling (LlamaIndex's ``FunctionCallingLLM`` protocol: ``chat_with_tools``, ``predict_and_call``,
``FunctionAgent``) is the engine's: tools go to the chat template as OpenAI-style dicts, the engine parses the
calls in the template's own format and writes the reply as the assistant message carrying them (ids included).
The reply comes back with the same calls (``additional_kwargs["tool_calls"]`` and ``ToolCallBlock`` blocks), so the
resend of it with the tool results matches what was written: only the results and the new answer are written.
Only for models whose template has a call format the engine parses (``engine.tool_call_format``); tools offered
to any other model raise :class:`~deltamem_agents.integrations.ToolCallingUnsupportedError`.

Engines, throwaway sessions, generation defaults, result metadata and message rules come from the integration
core shared with the LangChain package (:mod:`deltamem_agents.integrations`); this module adapts them to
LlamaIndex.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
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
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from deltamem_agents.engine.errors import InvalidOptionError
from deltamem_agents.integrations import (
    EMBEDDED_MODEL_NAME,
    GenerationDefaults,
    NoToolCallError,
    SessionTarget,
    ToolCallingUnsupportedError,
    check_tool_calling,
    clear_engines,
    engine_message,
    engine_role,
    generation_options,
    get_engine,
    openai_tool_call,
    result_metadata,
    served_model_name,
    supports_tool_calls,
    text_from_parts,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

    from deltamem_agents import MemoryEngine
    from deltamem_agents.engine import ChatResult
    from deltamem_agents.engine.tool_calls import ToolCallFormat

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "DeltaMemLLM",
    "NoToolCallError",
    "ToolCallingUnsupportedError",
    "clear_engines",
    "current_session",
    "get_engine",
    "session_scope",
]

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
def _tool_call_dict(call: Any) -> Any:
    """One entry of ``additional_kwargs["tool_calls"]`` as a dict: a dict as it is; a pydantic object (the OpenAI
    SDK's ``ChatCompletionMessageToolCall``, which ``llama-index-llms-openai`` keeps there) dumped. Anything else
    is passed on for the engine to refuse (``InvalidMessageError``)."""
    if isinstance(call, Mapping):
        return dict(call)
    dump = getattr(call, "model_dump", None)
    return dump() if callable(dump) else call


def message_tool_calls(message: ChatMessage) -> list[Any] | None:
    """The tool calls a message carries: ``additional_kwargs["tool_calls"]`` (the OpenAI shape), else its
    ``ToolCallBlock`` blocks (LlamaIndex 0.14's content blocks; a history rebuilt from blocks alone still matches
    what the engine wrote). ``None`` when there are none."""
    calls = (message.additional_kwargs or {}).get("tool_calls")
    if calls:
        return [_tool_call_dict(c) for c in calls] if isinstance(calls, list | tuple) else calls
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        return [openai_tool_call(b.tool_call_id, b.tool_name, b.tool_kwargs) for b in blocks]
    return None


def to_engine_message(message: ChatMessage) -> dict[str, Any]:
    """A LlamaIndex ``ChatMessage`` as the engine's message dict (text only: an image, audio or document block
    raises :class:`~deltamem_agents.engine.InvalidMessageError`, a ``ValueError``; ``name`` and
    ``tool_call_id`` from ``additional_kwargs`` are kept, and the tool calls of :func:`message_tool_calls`)."""
    role_value = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    role = engine_role(role_value)
    # ToolCallBlocks are not text: they travel as ``tool_calls`` (text_from_parts drops an assistant's non-text)
    parts = [("text", b.text) if isinstance(b, TextBlock) else (type(b).__name__, None) for b in message.blocks]
    extra = message.additional_kwargs or {}
    return engine_message(role, text_from_parts(parts, role=role, owner="DeltaMemLLM"), name=extra.get("name"),
                          tool_calls=message_tool_calls(message), tool_call_id=extra.get("tool_call_id"))


def tool_spec(tool: Any) -> dict[str, Any]:
    """A tool as the OpenAI-style dict the engine passes to the chat template: a LlamaIndex ``BaseTool`` through
    ``metadata.to_openai_tool()``; a dict as it is (the engine checks it). Anything else raises
    :class:`~deltamem_agents.engine.InvalidOptionError` (a ``ValueError``)."""
    if isinstance(tool, Mapping):
        return dict(tool)
    metadata = getattr(tool, "metadata", None)
    if metadata is None or not callable(getattr(metadata, "to_openai_tool", None)):
        raise InvalidOptionError("tools", "DeltaMemLLM: a tool must be a LlamaIndex BaseTool or an OpenAI-style "
                                 f"dict, got {type(tool).__name__}")
    return metadata.to_openai_tool(skip_length_check=True)


def reply_message(content: str, result: ChatResult | None) -> ChatMessage:
    """The assistant message of a reply; with tool calls, as the engine wrote it: the text outside the calls,
    and the calls (same ids) in ``additional_kwargs["tool_calls"]`` (OpenAI shape, ``arguments`` a JSON string)
    and as ``ToolCallBlock`` blocks."""
    if result is None or not result.tool_calls:
        return ChatMessage(role=MessageRole.ASSISTANT, content=content)
    blocks: list[Any] = [TextBlock(text=content)] if content else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.args) for c in result.tool_calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks,
                       additional_kwargs={"tool_calls": [c.to_openai() for c in result.tool_calls]})


class _ReplyText:
    """The text of a streamed reply, and what of it is sent as deltas.

    Without tools every piece is sent as it comes. With tools only the *settled* content is sent — text that no
    continuation can turn into part of a call (``ToolCallFormat.settled_content``) — so neither a call nor half
    of its opening tag reaches a delta; the final chunk sends the rest of the reply's content (the text outside
    the calls). The deltas then add up to the final message's content, as for the server's streamed replies."""

    def __init__(self, tool_format: ToolCallFormat | None, tools: list[dict[str, Any]] | None) -> None:
        self.format = tool_format if tools else None
        self.tools = tools
        self.text = ""  # everything generated so far, calls included
        self.sent = ""  # the content sent as deltas so far

    def add(self, piece: str) -> str:
        """Take a generated piece; return the delta to send now (may be empty)."""
        self.text += piece
        if self.format is None:
            delta = piece
        else:
            settled = self.format.settled_content(self.text, self.tools)
            delta = settled[len(self.sent):] if len(settled) > len(self.sent) else ""
        self.sent += delta
        return delta

    def finish(self, result: ChatResult) -> tuple[str, str]:
        """``(content, last delta)`` when the turn ended with ``result``."""
        if self.format is None:
            return self.text, ""
        content = result.content or ""  # None: the reply is only calls
        # settled content is a prefix of the final content (the format's contract), so this completes the deltas
        delta = content[len(self.sent):]
        self.sent = content
        return content, delta


def _reply_text(target: SessionTarget, options: dict[str, Any]) -> _ReplyText:
    return _ReplyText(getattr(target.engine, "tool_call_format", None), options.get("tools"))


# ---------------------------------------------------------------------------------------------- the LLM
class DeltaMemLLM(FunctionCallingLLM):
    """LlamaIndex LLM backed by a δ-mem :class:`~deltamem_agents.MemoryEngine`.

    Every call is a turn of a session (see the module docstring for which): the session's state is read while
    answering, and the call's new messages and the reply are written into it. ``complete(prompt)`` is a chat turn
    with one user message (the chat template is always applied; ``formatted`` is ignored).

    Engines are shared: instances naming the same ``(model, adapter, store, window_tokens)`` — and LangChain's
    ``ChatDeltaMem`` in the same process — use one engine, loaded on first use. Pass ``engine=`` to use your own.

    Generation options left ``None`` take the engine's defaults (``temperature`` 0.2, ``top_p`` 0.9,
    ``repetition_penalty`` 1.1, 512 new tokens unless the engine was built otherwise); a value set here or per
    call wins.

    Tool calling follows LlamaIndex's ``FunctionCallingLLM`` protocol for models whose chat template has a call
    format the engine parses (``metadata.is_function_calling_model`` says so): see the module docstring and
    ``docs/integrations/llamaindex.md``. ``tool_choice`` ``"none"`` leaves the tools out; ``tool_required``, a
    named ``tool_choice`` and ``allow_parallel_tool_calls=False`` are accepted but not enforced (no constrained
    decoding; the reply is written with every call it made, so none is dropped from the returned message).
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
        """Context window from the engine (loads it); a chat model; function calling when the model's template
        has a tool-call format the engine parses (not the embedded SmolLM2-135M-Instruct's)."""
        engine = self.get_engine()
        num_output = self.max_new_tokens if self.max_new_tokens is not None else GenerationDefaults.of(
            engine).max_new_tokens
        return LLMMetadata(
            context_window=engine.context_window,
            num_output=num_output,
            is_chat_model=True,
            is_function_calling_model=supports_tool_calls(engine),
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
        tools = kwargs.pop("tools", None)
        if kwargs.pop("tool_choice", None) == "none":
            tools = None
        # cannot be enforced without constrained decoding; accepted (as the server does), see the class docstring
        kwargs.pop("tool_required", None)
        kwargs.pop("parallel_tool_calls", None)
        specs = [tool_spec(t) for t in tools] if tools else None
        if specs:
            check_tool_calling(engine, owner="DeltaMemLLM", model_name=self.model_name)
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
        if specs:
            options["tools"] = specs
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
        return self._responses(iterator, target, _reply_text(target, options))

    def _response(self, reply: _ReplyText, chunk: Any, target: SessionTarget,
                  version: int | None) -> ChatResponse | None:
        """The response for one engine chunk (``None``: nothing to send yet); the last one carries the result's
        metadata in ``raw``, its usage in ``additional_kwargs`` and, with calls, the calls on its message."""
        delta = reply.add(chunk.text)
        if chunk.result is None:
            if not delta:
                return None
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=reply.sent), delta=delta)
        content, rest = reply.finish(chunk.result)
        raw = self._raw(target, chunk.result, version)
        return ChatResponse(message=reply_message(content, chunk.result), delta=delta + rest, raw=raw,
                            additional_kwargs=dict(raw["usage"]))

    def _responses(self, iterator: Iterator[Any], target: SessionTarget,
                   reply: _ReplyText) -> Iterator[ChatResponse]:
        try:
            for chunk in iterator:
                version = target.version(chunk.result) if chunk.result is not None else None
                response = self._response(reply, chunk, target, version)
                if response is not None:
                    yield response
        finally:
            iterator.close()
            target.discard()

    def _astream_chat_iter(self, messages: Sequence[ChatMessage],
                           kwargs: dict[str, Any]) -> AsyncIterator[ChatResponse]:
        """As :meth:`_stream_chat_iter` (eager session resolution), over the engine's async stream."""
        target, msgs, options = self._call_args(messages, dict(kwargs))
        return self._aresponses(target.engine.astream(target.session_id, msgs, **options), target,
                                _reply_text(target, options))

    async def _aresponses(self, iterator: AsyncIterator[Any], target: SessionTarget,
                          reply: _ReplyText) -> AsyncIterator[ChatResponse]:
        try:
            async for chunk in iterator:
                version = None
                if chunk.result is not None:
                    version = await asyncio.to_thread(target.version, chunk.result)  # a store read
                response = self._response(reply, chunk, target, version)
                if response is not None:
                    yield response
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

    # ------------------------------------------------------------------------------------------ tools
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ``chat`` arguments of a ``chat_with_tools`` call: the history plus ``user_msg`` (the caller's list
        is not changed), the tools as OpenAI-style dicts, and ``tool_choice`` (only ``"none"`` has an effect).
        ``tool_required`` and ``allow_parallel_tool_calls`` cannot be enforced and are not passed on."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        if tool_required or tool_choice not in (None, "auto", "none"):
            logger.debug("DeltaMemLLM cannot force a tool call (tool_required=%s, tool_choice=%r): not enforced",
                         tool_required, tool_choice)
        return {"messages": messages, "tools": [tool_spec(t) for t in tools] or None, "tool_choice": tool_choice,
                **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """The tool calls of a ``chat_with_tools`` reply as ``ToolSelection(tool_id, tool_name, tool_kwargs)``.

        Raises:
            NoToolCallError: (a ``ValueError``) the reply has no call and ``error_on_no_tool_call`` is set.
        """
        selections: list[ToolSelection] = []
        for call in message_tool_calls(response.message) or []:
            fn = call.get("function", call) if isinstance(call, Mapping) else {}
            args = fn.get("arguments", {})
            if isinstance(args, str):  # the OpenAI shape: JSON text (the engine always writes an object's)
                try:
                    args = json.loads(args)
                except ValueError:
                    args = {}
            selections.append(ToolSelection(tool_id=str(call.get("id") or ""), tool_name=str(fn.get("name", "")),
                                            tool_kwargs=args if isinstance(args, dict) else {}))
        if not selections and error_on_no_tool_call:
            raise NoToolCallError("DeltaMemLLM: the reply has no tool call (the model answered in text)")
        return selections

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
