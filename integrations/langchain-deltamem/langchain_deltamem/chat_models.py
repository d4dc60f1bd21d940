"""`ChatDeltaMem`: a LangChain chat model whose conversations are δ-mem sessions.

One streaming core: :meth:`ChatDeltaMem._stream` runs over :meth:`MemoryEngine.stream` and
:meth:`ChatDeltaMem._generate` aggregates it; the async pair runs over :meth:`MemoryEngine.astream`.

Which session a call belongs to, first match wins:

1. the call's ``session_id`` keyword (``llm.invoke(msgs, session_id="s")``) or a bound one
   (``llm.bind(session_id="s")``);
2. the LangGraph thread: ``thread_id`` in the run's config (``configurable.thread_id``, else
   ``metadata.thread_id``) — from the ``config`` given to ``invoke``/``stream`` or, inside a graph node, from the
   current runnable context;
3. the model's ``session_id`` field;
4. none of these: the call runs in a throwaway session that is deleted afterwards (stateless, like any chat
   model).

Frameworks resend the whole history every call; the engine recognises what it has already written (idempotent
writes) and writes only what is new — or rolls back and replays when an earlier message was edited.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.runnables.config import ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from pydantic.v1 import BaseModel as BaseModelV1

from langchain_deltamem._parsing import extract_json, parse_tool_calls, template_supports_tools
from langchain_deltamem.engines import get_engine

__all__ = ["EMBEDDED_MODEL_NAME", "ChatDeltaMem"]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The name reported (``model_name``, LangSmith ``ls_model_name``) when ``model`` is ``None``."""

_ROLE_ALIASES = {"human": "user", "ai": "assistant", "function": "tool"}
# Keyword arguments a call may carry that are ours; anything else is ignored (logged at debug level).
_CALL_KEYS = frozenset({
    "session_id", "namespace", "mode", "history", "temperature", "max_tokens", "max_new_tokens", "top_p", "top_k",
    "seed", "tools", "tool_choice", "model", "timeout",
})


@dataclass
class _Call:
    """Everything one call needs, resolved before the engine is asked for anything."""

    engine: Any
    session_id: str
    ephemeral: bool
    messages: list[dict[str, Any]]
    options: dict[str, Any]
    tools: list[dict[str, Any]] | None
    model_name: str
    timeout: float | None
    started: float = field(default_factory=time.monotonic)


def thread_id_from_config(config: RunnableConfig | None) -> str | None:
    """The LangGraph thread id in a runnable config: ``configurable.thread_id``, else ``metadata.thread_id``."""
    if not config:
        return None
    for section in ("configurable", "metadata"):
        value = (config.get(section) or {}).get("thread_id")
        if value not in (None, ""):
            return str(value)
    return None


class ChatDeltaMem(BaseChatModel):
    """Chat model backed by a δ-mem :class:`~deltamem_agents.MemoryEngine`.

    Every call is a turn of a session: the session's δ-mem state is read while answering, and the call's new
    messages and the reply are written into it. See the module docstring for how the session is chosen.

    Example:
        .. code-block:: python

            from langchain_deltamem import ChatDeltaMem

            llm = ChatDeltaMem(session_id="alice", max_tokens=64)
            llm.invoke("Our project names every test file test_<module>.py.")
            llm.invoke("How should I name the tests of parser.py?")

    Engines are shared: every instance with the same ``(model, adapter, store, window_tokens)`` uses one engine,
    loaded on first use (:func:`langchain_deltamem.get_engine`). Pass ``engine=`` to use your own.

    ``cache`` defaults to ``False``: a cache hit would return a stored answer without running the engine, so the
    turn would not be written into the session's memory. Enable a LangChain cache only for stateless use.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    # ---- engine --------------------------------------------------------------------------------------------
    model: str | None = None
    """Base model: ``None`` (the embedded SmolLM2-135M-Instruct), a local directory, GGUF file or hub id."""
    adapter: str | None = None
    """δ-mem adapter: ``None`` (the shipped one when it fits), a directory, or ``"none"`` (fresh, untrained)."""
    store: str | None = None
    """Session store URL (``sqlite:///…``, ``postgresql://…``); ``None`` is SQLite in the user's cache."""
    window_tokens: int = 1024
    """Tokens of recent history kept as text in the prompt in ``windowed`` mode."""
    engine: Any = Field(default=None, exclude=True)
    """A :class:`~deltamem_agents.MemoryEngine` to use instead of the shared one (then ``model``, ``adapter``,
    ``store`` and ``window_tokens`` are not used)."""

    # ---- sessions ------------------------------------------------------------------------------------------
    session_id: str | None = None
    """Default session (after the call's ``session_id`` and the LangGraph ``thread_id``)."""
    namespace: str | None = None
    """Namespace (tenant) of the sessions; ``None`` is the engine's default."""
    mode: Literal["windowed", "online", "state-only"] | None = None
    """``windowed``, ``online`` or ``state-only``; ``None`` is the engine's default (``windowed``)."""
    history: Literal["auto", "full", "append"] = "auto"
    """How a call's messages relate to what the session has written (see ``docs/engine.md``)."""

    # ---- generation ----------------------------------------------------------------------------------------
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    max_tokens: int | None = Field(default=256, alias="max_new_tokens")
    """Most tokens to generate per call (also accepted as ``max_new_tokens``)."""
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    """Seed of the sampler (for reproducible sampling with ``temperature > 0``)."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings (cut from the reply); a call's ``stop`` replaces them."""
    timeout: float | None = None
    """Seconds a call may take; checked between generated tokens (a call past it raises ``TimeoutError`` and
    writes nothing)."""
    max_retries: int = 0
    """Accepted for compatibility with LangChain's standard parameters; a local model has no requests to retry
    (the engine itself retries a write after a concurrent update)."""
    streaming: bool = False
    """Stream through ``_stream`` also for ``invoke`` (callbacks then see every token)."""
    cache: Any = False  # see the class docstring: a cache hit would skip the memory write

    _engine: Any = PrivateAttr(default=None)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def _llm_type(self) -> str:
        return "deltamem-chat"

    @property
    def model_name(self) -> str:
        """The model's name as reported in traces and ``response_metadata`` (no model is loaded for it)."""
        if self.model is not None:
            return str(self.model)
        if self.engine is not None:
            return str(getattr(self.engine, "model_name", EMBEDDED_MODEL_NAME))
        return EMBEDDED_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model_name, "adapter": self.adapter, "mode": self.mode, "window_tokens": self.window_tokens,
            "temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p, "top_k": self.top_k,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="deltamem",
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or kwargs.get("stop") or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def get_engine(self) -> Any:
        """The :class:`~deltamem_agents.MemoryEngine` this model runs on (loaded on first use)."""
        if self.engine is not None:
            return self.engine
        if self._engine is None:
            self._engine = get_engine(self.model, adapter=self.adapter, store=self.store,
                                      window_tokens=self.window_tokens)
        return self._engine

    # ------------------------------------------------------------------------------------------ routing
    def _route(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Put the LangGraph thread id of ``config`` (or of the current runnable context) into the call's
        keywords, unless the call already names a session."""
        if kwargs.get("session_id") is None:
            thread = thread_id_from_config(ensure_config(config))
            if thread is not None:
                kwargs = {**kwargs, "session_id": thread}
        return kwargs

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        return super().invoke(input, config, stop=stop, **self._route(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **self._route(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        yield from super().stream(input, config, stop=stop, **self._route(config, kwargs))

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        async for chunk in super().astream(input, config, stop=stop, **self._route(config, kwargs)):
            yield chunk

    def resolve_session(self, run_manager: Any = None, **kwargs: Any) -> str | None:
        """The session a call with these keywords would use (``None``: a throwaway session)."""
        if kwargs.get("session_id") is not None:
            return str(kwargs["session_id"])
        thread = thread_id_from_config(ensure_config())
        if thread is None and run_manager is not None:
            thread = thread_id_from_config({"metadata": getattr(run_manager, "metadata", None) or {}})
        if thread is not None:
            return thread
        return self.session_id

    # ------------------------------------------------------------------------------------------ a call
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, run_manager: Any,
                 kwargs: dict[str, Any]) -> _Call:
        unknown = sorted(set(kwargs) - _CALL_KEYS - {"ls_structured_output_format", "stream"})
        if unknown:
            logger.debug("ChatDeltaMem ignores call arguments %s", unknown)
        requested = kwargs.get("model")
        if requested is not None and str(requested) != self.model_name:
            raise ValueError(
                f"ChatDeltaMem runs {self.model_name!r}; a call cannot switch to model {requested!r} "
                "(create another ChatDeltaMem with model=... instead)"
            )
        engine = self.get_engine()
        tools = kwargs.get("tools")
        if kwargs.get("tool_choice") == "none":
            tools = None
        if tools:
            self._check_tools_supported(engine)
        session_id = self.resolve_session(run_manager, **kwargs)
        ephemeral = session_id is None
        if ephemeral:
            session_id = f"ephemeral-{uuid.uuid4().hex}"
        max_new = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        options: dict[str, Any] = {
            "namespace": kwargs.get("namespace", self.namespace),
            "mode": kwargs.get("mode", self.mode),
            "history": "full" if ephemeral else kwargs.get("history", self.history),
            "max_new_tokens": 256 if max_new is None else int(max_new),
            "temperature": float(kwargs.get("temperature", self.temperature)),
            "top_p": float(kwargs.get("top_p", self.top_p)),
            "top_k": kwargs.get("top_k", self.top_k),
            "seed": kwargs.get("seed", self.seed),
            "stop": list(stop if stop is not None else (self.stop or [])),
        }
        if tools:
            options["tools"] = list(tools)
        return _Call(
            engine=engine, session_id=session_id, ephemeral=ephemeral,
            messages=[to_engine_message(m) for m in messages], options=options, tools=list(tools) if tools else None,
            model_name=self.model_name, timeout=kwargs.get("timeout", self.timeout),
        )

    def _check_timeout(self, call: _Call) -> None:
        if call.timeout is not None and time.monotonic() - call.started > call.timeout:
            raise TimeoutError(f"ChatDeltaMem call took longer than timeout={call.timeout}s; nothing was written")

    def _finish(self, call: _Call) -> None:
        if call.ephemeral:
            try:
                call.engine.delete(call.session_id, namespace=call.options["namespace"])
            except Exception:  # the session may not exist (a call that failed before creating it)
                logger.debug("could not delete throwaway session %s", call.session_id, exc_info=True)

    def _text_chunk(self, text: str) -> ChatGenerationChunk:
        return ChatGenerationChunk(message=AIMessageChunk(content=text))

    def _last_chunk(self, call: _Call, text: str, result: Any) -> ChatGenerationChunk:
        """The final chunk: the rest of the text, tool calls (when tools were bound), usage and metadata."""
        usage = result.usage
        response_metadata = {
            "model_name": call.model_name,
            "model_provider": "deltamem",
            "finish_reason": result.finish_reason,
            "session_id": None if call.ephemeral else result.session_id,
            "namespace": result.namespace,
            "turn": None if call.ephemeral else result.turn,
            "replayed": result.replayed,
            "rolled_back_to": result.rolled_back_to,
            "mode": result.mode,
            "written_tokens": usage.written_tokens,
            "full_context_tokens": usage.full_context_tokens,
        }
        usage_metadata = {
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }
        tool_call_chunks: list[dict[str, Any]] = []
        invalid: list[dict[str, Any]] = []
        if call.tools:
            text, calls, invalid = parse_tool_calls(text)
            tool_call_chunks = [
                {"type": "tool_call_chunk", "name": c["name"], "args": _json_dumps(c["args"]), "id": c["id"],
                 "index": i}
                for i, c in enumerate(calls)
            ]
            if calls:
                response_metadata["finish_reason"] = "tool_calls"
        message = AIMessageChunk(
            content=text, usage_metadata=usage_metadata, response_metadata=response_metadata,
            tool_call_chunks=tool_call_chunks, invalid_tool_calls=invalid, chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": result.finish_reason})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, run_manager, kwargs)
        iterator = call.engine.stream(call.session_id, call.messages, **call.options)
        buffered: list[str] = []  # with tools bound the reply is parsed whole, so it is held back
        try:
            for chunk in iterator:
                if chunk.result is None:
                    self._check_timeout(call)
                    if not chunk.text:
                        continue
                    if call.tools:
                        buffered.append(chunk.text)
                        continue
                    gen = self._text_chunk(chunk.text)
                    if run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=gen)
                    yield gen
                else:
                    last = self._last_chunk(call, "".join(buffered) + chunk.text, chunk.result)
                    if run_manager is not None and isinstance(last.message.content, str) and last.message.content:
                        run_manager.on_llm_new_token(last.message.content, chunk=last)
                    yield last
        finally:
            iterator.close()  # an abandoned stream commits nothing (engine contract)
            self._finish(call)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, run_manager, kwargs)
        iterator = call.engine.astream(call.session_id, call.messages, **call.options)
        buffered: list[str] = []
        try:
            async for chunk in iterator:
                if chunk.result is None:
                    self._check_timeout(call)
                    if not chunk.text:
                        continue
                    if call.tools:
                        buffered.append(chunk.text)
                        continue
                    gen = self._text_chunk(chunk.text)
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=gen)
                    yield gen
                else:
                    last = self._last_chunk(call, "".join(buffered) + chunk.text, chunk.result)
                    if run_manager is not None and isinstance(last.message.content, str) and last.message.content:
                        await run_manager.on_llm_new_token(last.message.content, chunk=last)
                    yield last
        finally:
            await iterator.aclose()
            self._finish(call)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop=stop, run_manager=run_manager, **kwargs))

    # ------------------------------------------------------------------------------------------ tools
    def supports_tools(self) -> bool:
        """Whether the model's chat template renders tools (loads the engine). SmolLM2's does not."""
        return template_supports_tools(self.get_engine().tokenizer)

    def _check_tools_supported(self, engine: Any) -> None:
        if not template_supports_tools(engine.tokenizer):
            raise NotImplementedError(
                f"{self.model_name}: its chat template does not render tools, so ChatDeltaMem cannot offer tool "
                "calling with it (a model would have to be prompted in a format it was never trained on). Use a "
                "model whose template supports tools (e.g. Qwen3), or a prompt-based agent (ReAct-style) instead."
            )

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: they are rendered by the model's chat template, and ``<tool_call>{…}</tool_call>`` blocks
        in the reply come back as ``AIMessage.tool_calls``.

        Only for models whose chat template renders tools: raises :class:`NotImplementedError` otherwise (the
        embedded SmolLM2-135M-Instruct among them). ``tool_choice`` may be ``None``, ``"auto"`` or ``"none"``:
        a local model cannot be forced to call a tool, so other values raise :class:`NotImplementedError`.
        """
        self._check_tools_supported(self.get_engine())
        if tool_choice not in (None, "auto", "none"):
            raise NotImplementedError(
                f"tool_choice={tool_choice!r}: ChatDeltaMem cannot force a tool call; use None, 'auto' or 'none'"
            )
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return super().bind(tools=formatted, **kwargs)

    # ------------------------------------------------------------------------------------------ structured
    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Structured output by prompting and parsing (no constrained decoding).

        An instruction is appended to the messages as a last system message — the schema's JSON Schema for
        ``"json_schema"`` (and for ``"function_calling"``, which is served the same way since tool calls are
        not generally available), or "answer with one JSON object" for ``"json_mode"`` — and the first JSON
        object of the reply is parsed (and validated against a Pydantic schema). A reply without valid JSON
        raises :class:`~langchain_core.exceptions.OutputParserException` (or, with ``include_raw=True``, is
        returned as ``parsing_error``).

        The embedded 135M model follows this only sometimes: expect parsing errors with it; a larger model
        follows it reliably. ``strict`` is accepted for compatibility (validation is always applied when the
        schema is a Pydantic class).
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        if method not in ("json_schema", "json_mode", "function_calling"):
            raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', got {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema")
        is_pydantic = isinstance(schema, type) and issubclass(schema, BaseModel | BaseModelV1)
        if method == "json_mode":
            instruction = "Answer with exactly one JSON object and nothing else: no prose, no code fences."
        else:
            json_schema = convert_to_json_schema(schema)
            instruction = (
                "Answer with exactly one JSON object that conforms to this JSON Schema, and nothing else "
                f"(no prose, no code fences):\n{_json_dumps(json_schema)}"
            )
        fmt = {"kwargs": {"method": method}, "schema": schema}
        llm = RunnableLambda(lambda value: _with_instruction(self, value, instruction), name="DeltaMemJsonPrompt")
        llm = llm | self.bind(ls_structured_output_format=fmt)

        def parse(message: AIMessage) -> Any:
            text = message.text if hasattr(message, "text") else str(message.content)
            value = extract_json(text)
            if is_pydantic:
                try:
                    if issubclass(schema, BaseModelV1):  # type: ignore[arg-type]
                        return schema.parse_obj(value)  # type: ignore[union-attr]
                    return schema.model_validate(value)  # type: ignore[union-attr]
                except Exception as exc:
                    raise OutputParserException(f"JSON does not match {schema.__name__}: {exc}",  # type: ignore[union-attr]
                                                llm_output=text) from exc
            return value

        parser = RunnableLambda(parse, name="DeltaMemJsonParser")
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | with_fallback


# ---------------------------------------------------------------------------------------------- helpers
def _json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _with_instruction(model: ChatDeltaMem, value: LanguageModelInput, instruction: str) -> list[BaseMessage]:
    messages = model._convert_input(value).to_messages()
    return [*messages, SystemMessage(content=instruction)]


def _text_of(content: str | list[Any], role: str) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif role == "assistant":  # tool-call / reasoning blocks: tool calls travel in ``tool_calls``
            continue
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"ChatDeltaMem accepts text only; got a content block of type {kind!r}")
    return "".join(parts)


def to_engine_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as the engine's message dict (``role``, ``content`` and, where present, ``name``,
    ``tool_calls`` in the OpenAI shape, ``tool_call_id``)."""
    if isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, ToolMessage | FunctionMessage):
        role = "tool"
    elif isinstance(message, ChatMessage):
        role = _ROLE_ALIASES.get(message.role, message.role)
    else:
        raise ValueError(f"unsupported message type {type(message).__name__}")
    out: dict[str, Any] = {"role": role, "content": _text_of(message.content, role)}
    if message.name:
        out["name"] = message.name
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = [
            {"id": tc.get("id"), "type": "function", "function": {"name": tc["name"], "arguments": tc["args"]}}
            for tc in message.tool_calls
        ]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out
