"""What a turn returns: :class:`ChatResult`, :class:`ChatChunk`, :class:`Usage`, :class:`WriteResult`."""

from __future__ import annotations

from dataclasses import dataclass

from .tool_calls import ToolCall

__all__ = ["ChatChunk", "ChatResult", "Usage", "WriteResult"]


@dataclass(frozen=True)
class Usage:
    """Token counts of one call.

    Attributes:
        prompt_tokens: tokens in the prompt the model read.
        completion_tokens: tokens generated.
        written_tokens: tokens written into the state by this call (new messages and the reply; replayed
            messages included).
        full_context_tokens: tokens a full-context prompt of the whole history (including this turn) would need
            — what windowed mode saves.
        cached_tokens: tokens of the prompt reused from the session's KV cache of the previous turn (online
            mode): not run again. ``prompt_tokens - cached_tokens`` is what this turn prefilled.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    written_tokens: int = 0
    full_context_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatResult:
    """One generated turn.

    Attributes:
        text: the reply as generated (stop strings cut off), tool calls included as the model wrote them.
        finish_reason: ``"stop"`` (EOS or a stop string), ``"length"`` (``max_new_tokens`` reached) or
            ``"tool_calls"`` (the reply holds tool calls and ended by itself; a reply cut at ``max_new_tokens``
            stays ``"length"``).
        usage: token counts.
        session_id, namespace: the session.
        turn: the session's turn after this call (the snapshot that holds the reply).
        replayed: the history diverged from what was written; the state was rolled back to ``rolled_back_to``
            and the rest of the history written again.
        rolled_back_to: the snapshot turn the replay started from (None unless ``replayed``).
        written_messages: number of messages written by this call (new ones, replayed ones and the reply).
        mode: the mode used.
        kv_cache: online mode: how the turn got its KV context — ``"hot"`` (the previous turn's, in memory),
            ``"disk"`` (its saved file), ``"rebuilt"`` (re-prefilled from text: a miss), ``"slid"`` (the budget
            filled: older messages left, the rest was re-prefilled), ``"new"`` (nothing to prefill); ``None`` in
            the other modes.
        content: the text outside the tool calls (``None`` when the reply is only calls); ``text`` when there
            are no calls. See :mod:`.tool_calls`.
        tool_calls: the calls parsed from the reply (only when ``tools`` were given and the chat template has a
            call format); the reply is written as an assistant message with these ``tool_calls``.
        version: the session's version after the commit (what ``expected_version`` of the next call names).
    """

    text: str
    finish_reason: str
    usage: Usage
    session_id: str
    namespace: str
    turn: int
    replayed: bool = False
    rolled_back_to: int | None = None
    written_messages: int = 0
    mode: str = "online"
    kv_cache: str | None = None
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    version: int | None = None

    def __post_init__(self) -> None:
        if not self.tool_calls and self.content is None:
            object.__setattr__(self, "content", self.text)


@dataclass(frozen=True)
class ChatChunk:
    """A piece of a streamed reply. The last chunk has ``finish_reason`` and ``result`` set (and usually an
    empty ``text``); concatenating every chunk's ``text`` gives ``result.text``."""

    text: str
    session_id: str
    finish_reason: str | None = None
    usage: Usage | None = None
    result: ChatResult | None = None


@dataclass(frozen=True)
class WriteResult:
    """What :meth:`MemoryEngine.write` did."""

    session_id: str
    namespace: str
    turn: int
    written_messages: int
    written_tokens: int
    replayed: bool = False
    rolled_back_to: int | None = None
    version: int | None = None
