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
4. none of these: the call runs in a throwaway session on the engine's twin, with a private in-memory store, and
   is deleted afterwards (stateless, like any chat model; nothing reaches the session store).

Frameworks resend the whole history every call; the engine recognises what it has already written (idempotent
writes) and writes only what is new — or rolls back and replays when an earlier message was edited.

Engines, throwaway sessions, generation defaults, result metadata and message rules come from the integration
core shared with the LlamaIndex package (:mod:`deltamem_agents.integrations`); this module adapts them to
LangChain.
"""

from __future__ import annotations

import asyncio
import logging
import time
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

from deltamem_agents.integrations import (
    EMBEDDED_MODEL_NAME,
    GenerationDefaults,
    SessionTarget,
    engine_message,
    engine_role,
    generation_options,
    get_engine,
    openai_tool_call,
    result_metadata,
    served_model_name,
    text_from_parts,
)
from langchain_deltamem._parsing import extract_json, parse_tool_calls, template_supports_tools

__all__ = ["EMBEDDED_MODEL_NAME", "ChatDeltaMem"]

logger = logging.getLogger(__name__)

# Keyword arguments a call may carry that are ours; anything else is ignored (logged at debug level).
_CALL_KEYS = frozenset({
    "session_id", "namespace", "mode", "history", "on_divergence", "temperature", "max_tokens", "max_new_tokens", "top_p", "top_k",
    "repetition_penalty", "seed", "tools", "tool_choice", "model", "timeout",
})


@dataclass
class _Call:
    """Everything one call needs, resolved before the engine is asked for anything."""

    target: SessionTarget
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

    Engines are shared: every instance with the same ``(model, adapter, store, window_tokens)`` — and every
    LlamaIndex ``DeltaMemLLM`` in the process — uses one engine, loaded on first use
    (:func:`langchain_deltamem.get_engine`). Pass ``engine=`` to use your own.

    Generation options left ``None`` take the engine's defaults (``temperature`` 0.2, ``top_p`` 0.9,
    ``repetition_penalty`` 1.1, 512 new tokens unless the engine was built otherwise); a value set here or per
    call wins.

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
    """``online``, ``windowed`` or ``state-only``; ``None`` is the engine's default (``online``)."""
    history: Literal["auto", "full", "append"] = "auto"
    """How a call's messages relate to what the session has written (see ``docs/engine.md``)."""
    on_divergence: Literal["reject", "rollback"] | None = None
    """A history that diverges from what the session holds (an edit, a regenerate, another writer): ``"reject"``
    (a ``HistoryConflictError``, nothing written) or ``"rollback"`` (roll back and replay this history);
    ``None``: the engine's default (``"reject"``). See ``docs/engine.md``, "Several clients on one session"."""

    # ---- generation: ``None`` is the engine's default (one source of truth: ``MemoryEngine``'s) --------------
    temperature: float | None = None
    """Sampling temperature; 0 is greedy. ``None``: the engine's (0.2 unless the engine was built otherwise)."""
    max_tokens: int | None = Field(default=None, alias="max_new_tokens")
    """Most tokens to generate per call (also accepted as ``max_new_tokens``); ``None``: the engine's (512)."""
    top_p: float | None = None
    """Nucleus sampling; ``None``: the engine's (0.9)."""
    top_k: int | None = None
    """Top-k sampling; ``None``: the engine's (none)."""
    repetition_penalty: float | None = None
    """Penalty on tokens already generated in this reply; ``None``: the engine's (1.1); 1.0 turns it off."""
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
        """The model's name as the engine reports it, in traces and ``response_metadata`` (no model is loaded
        for it: the embedded model's name, a directory's or GGUF file's base name, or a hub id)."""
        return served_model_name(self.model, self.engine if self.engine is not None else self._engine)

    def generation_defaults(self) -> GenerationDefaults:
        """What the engine uses for an option left ``None`` (without loading it: a ``MemoryEngine``'s defaults
        until the engine exists)."""
        return GenerationDefaults.of(self.engine if self.engine is not None else self._engine)

    def _effective_generation(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The generation values a call with these keywords runs with: the call's, else the field's, else the
        engine's."""
        explicit = self._explicit_generation(kwargs)
        explicit.pop("seed", None)
        explicit.pop("stop", None)
        return self.generation_defaults().effective(**explicit)

    def _explicit_generation(self, kwargs: dict[str, Any], stop: list[str] | None = None) -> dict[str, Any]:
        """The generation options set by the call (keywords, ``stop``) or the fields; ``None`` = not set."""
        max_new = kwargs.get("max_tokens", kwargs.get("max_new_tokens"))
        stops = stop if stop is not None else kwargs.get("stop")
        return {
            "max_new_tokens": max_new if max_new is not None else self.max_tokens,
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "top_k": kwargs.get("top_k", self.top_k),
            "repetition_penalty": kwargs.get("repetition_penalty", self.repetition_penalty),
            "seed": kwargs.get("seed", self.seed),
            "stop": list(stops) if stops is not None else (list(self.stop) if self.stop else None),
        }

    @property
    def _identifying_params(self) -> dict[str, Any]:
        gen = self._effective_generation({})
        return {
            "model": self.model_name, "adapter": self.adapter, "mode": self.mode, "window_tokens": self.window_tokens,
            "temperature": gen["temperature"], "max_tokens": gen["max_new_tokens"], "top_p": gen["top_p"],
            "top_k": gen["top_k"], "repetition_penalty": gen["repetition_penalty"],
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        gen = self._effective_generation(kwargs)
        params = LangSmithParams(
            ls_provider="deltamem",
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type="chat",
            ls_temperature=gen["temperature"],
        )
        params["ls_max_tokens"] = gen["max_new_tokens"]
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
        if requested is not None and str(requested) not in {self.model_name, str(self.model)}:
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
        msgs = [to_engine_message(m) for m in messages]  # refused before a throwaway session is set up
        target = SessionTarget.resolve(engine, self.resolve_session(run_manager, **kwargs),
                                       kwargs.get("namespace", self.namespace))
        options: dict[str, Any] = {
            **target.call_options(kwargs.get("history", self.history),
                                  kwargs.get("on_divergence", self.on_divergence)),
            "mode": kwargs.get("mode", self.mode),
            **generation_options(**self._explicit_generation(kwargs, stop)),
        }
        if tools:
            options["tools"] = list(tools)
        return _Call(
            target=target, messages=msgs, options=options, tools=list(tools) if tools else None,
            model_name=self.model_name, timeout=kwargs.get("timeout", self.timeout),
        )

    def _check_timeout(self, call: _Call) -> None:
        if call.timeout is not None and time.monotonic() - call.started > call.timeout:
            raise TimeoutError(f"ChatDeltaMem call took longer than timeout={call.timeout}s; nothing was written")

    def _text_chunk(self, text: str) -> ChatGenerationChunk:
        return ChatGenerationChunk(message=AIMessageChunk(content=text))

    def _last_chunk(self, call: _Call, text: str, result: Any, version: int | None) -> ChatGenerationChunk:
        """The final chunk: the rest of the text, tool calls (when tools were bound), usage and metadata."""
        meta = result_metadata(result, model_name=call.model_name, ephemeral=call.target.ephemeral,
                               version=version)
        usage = meta["usage"]
        response_metadata = {
            **meta,
            "model_provider": "deltamem",
            # documented flat keys of the first release, kept beside ``usage``
            "written_tokens": usage["written_tokens"],
            "full_context_tokens": usage["full_context_tokens"],
        }
        usage_metadata = {
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_token_details": {"cache_read": usage["cached_tokens"]},
        }
        tool_call_chunks: list[dict[str, Any]] = []
        invalid: list[dict[str, Any]] = []
        if call.tools and result.tool_calls:
            # Parsed by the engine, which wrote the reply as an assistant message with exactly these calls and ids:
            # the AIMessage LangChain resends next turn then matches the session's record (no replay).
            text = result.content or ""
            calls = [{"name": c.name, "args": c.args, "id": c.id} for c in result.tool_calls]
        elif call.tools and getattr(call.target.engine, "tool_call_format", None) is None:
            # a template the engine knows no call format of: ``<tool_call>`` blocks, parsed here
            text, calls, invalid = parse_tool_calls(text)
        else:  # no tools, or the engine's parser found no valid call (unknown tool, broken JSON): plain text
            calls = []
        if call.tools:
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
        target = call.target
        iterator = target.engine.stream(target.session_id, call.messages, **call.options)
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
                    version = target.version(chunk.result)
                    last = self._last_chunk(call, "".join(buffered) + chunk.text, chunk.result, version)
                    if run_manager is not None and isinstance(last.message.content, str) and last.message.content:
                        run_manager.on_llm_new_token(last.message.content, chunk=last)
                    yield last
        finally:
            iterator.close()  # an abandoned stream commits nothing (engine contract)
            target.discard()

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, run_manager, kwargs)
        target = call.target
        iterator = target.engine.astream(target.session_id, call.messages, **call.options)
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
                    version = await asyncio.to_thread(target.version, chunk.result)  # a store read
                    last = self._last_chunk(call, "".join(buffered) + chunk.text, chunk.result, version)
                    if run_manager is not None and isinstance(last.message.content, str) and last.message.content:
                        await run_manager.on_llm_new_token(last.message.content, chunk=last)
                    yield last
        finally:
            await iterator.aclose()
            target.discard()

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
        """Bind tools: they are rendered by the model's chat template, and the calls in the reply come back as
        ``AIMessage.tool_calls``. The engine parses them in the template's own format (Hermes / Qwen
        ``<tool_call>{…}</tool_call>``, Llama 3.x JSON; see ``deltamem_agents.engine.tool_calls``) and writes the
        reply with the same call ids, so resending the ``AIMessage`` with the tool results continues the session
        without a replay; for a template with no format the engine knows, ``<tool_call>`` blocks are parsed here.

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


def _content_parts(content: str | list[Any]) -> list[tuple[str, str | None]]:
    """LangChain content as ``(kind, text)`` parts (``text=None``: not text)."""
    if isinstance(content, str):
        return [("text", content)]
    parts: list[tuple[str, str | None]] = []
    for part in content:
        if isinstance(part, str):
            parts.append(("text", part))
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(("text", str(part.get("text", ""))))
        else:
            parts.append((str(part.get("type") if isinstance(part, dict) else type(part).__name__), None))
    return parts


def to_engine_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as the engine's message dict (``role``, ``content`` and, where present, ``name``,
    ``tool_calls`` in the OpenAI shape, ``tool_call_id``). Text only: an image, audio or file block raises
    :class:`~deltamem_agents.engine.InvalidMessageError` (a ``ValueError``)."""
    if isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, ToolMessage | FunctionMessage):
        role = "tool"
    elif isinstance(message, ChatMessage):
        role = engine_role(message.role)
    else:
        raise ValueError(f"unsupported message type {type(message).__name__}")
    return engine_message(
        role,
        text_from_parts(_content_parts(message.content), role=role, owner="ChatDeltaMem"),
        name=message.name,
        tool_calls=[openai_tool_call(tc.get("id"), tc["name"], tc["args"]) for tc in message.tool_calls]
        if isinstance(message, AIMessage) else None,
        tool_call_id=message.tool_call_id if isinstance(message, ToolMessage) else None,
    )
