"""Request bodies of the OpenAI-compatible endpoints (pydantic), and how they become engine arguments.

Unknown fields are accepted and ignored (clients send many we have no use for: ``user``, ``metadata``,
``parallel_tool_calls``, …); options we cannot honour *and* whose absence would change the answer's meaning
(``n > 1``, ``logprobs``, ``best_of > 1``, ``suffix``) are refused with 422 rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ConversationRef",
    "ForkRequest",
    "RollbackRequest",
    "StreamOptions",
]

#: OpenAI's limit on stop sequences.
MAX_STOP = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ConversationRef(BaseModel):
    """``conversation`` given as an object (``{"id": "conv_…"}``), as the Responses API allows."""

    model_config = ConfigDict(extra="allow")

    id: str


class ChatMessage(BaseModel):
    """One chat message. ``developer`` (OpenAI's newer name for system) is sent to the model as ``system``;
    ``function`` (the legacy tool result) as ``tool``. Content parts are checked by the engine (text only)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_engine(self) -> dict[str, Any]:
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        out: dict[str, Any] = {"role": role, "content": self.content}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class _GenerationRequest(BaseModel):
    """What both endpoints share: sampling, length, stop, streaming and the session fields."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # one model is served: any name is accepted, the response names the real one
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, not applied (docs/server.md)
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, not applied
    # deltamem extensions (OpenAI clients send them with extra_body=…)
    session_id: str | None = None
    conversation: str | ConversationRef | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported: a turn of a session has one answer")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _usage_needs_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c.id if isinstance(c, ConversationRef) else c

    def _limit(self) -> int | None:
        return self.max_tokens

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of ``MemoryEngine.chat``/``astream`` (``None``: the engine's default)."""
        return {
            "max_new_tokens": self._limit(), "temperature": self.temperature, "top_p": self.top_p,
            "stop": self.stop, "seed": self.seed,
        }  # fmt: skip


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``. Extensions: ``session_id``, ``conversation`` (pick the session, like the
    ``X-Session-ID`` header), ``history`` (``"full"``, default: the messages are the whole conversation;
    ``"append"``: they follow what the session already holds; ``"auto"``: the engine's rule, which also accepts a
    trimmed view of the conversation that ends with what the session holds) and ``on_divergence`` (``"reject"`` or
    ``"rollback"``, like the ``X-DeltaMem-On-Divergence`` header; default: the server's setting)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    history: Literal["full", "append", "auto"] = "full"
    on_divergence: Literal["reject", "rollback"] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def _limit(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are given
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_messages(self) -> list[dict[str, Any]]:
        return [m.to_engine() for m in self.messages]

    def engine_options(self) -> dict[str, Any]:
        options = super().engine_options()
        # tool_choice "none" means: do not offer the tools this turn
        if self.tools and self.tool_choice != "none":
            options["tools"] = self.tools
        return options


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: ``prompt`` (one string) is sent as one user message, to a throwaway session
    or appended to the given session."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1:
            raise ValueError("exactly one prompt string is supported (one answer per request)")
        if not prompts[0].strip():
            raise ValueError("the prompt must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only best_of=1 is supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ForkRequest(BaseModel):
    """``POST /v1/sessions/{id}/fork``: the new id (random when omitted) and the turn to fork at (latest)."""

    model_config = ConfigDict(extra="forbid")

    new_id: str | None = None
    turn: int | None = Field(None, ge=0)


class RollbackRequest(BaseModel):
    """``POST /v1/sessions/{id}/rollback``: go back to the snapshot after ``turn``."""

    model_config = ConfigDict(extra="forbid")

    turn: int = Field(ge=0)
