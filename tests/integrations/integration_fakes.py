"""A stand-in for :class:`~deltamem_agents.MemoryEngine` with the same public surface the integrations use, for
fast tests of pure logic (session routing, option plumbing) that need no model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from deltamem_agents.engine import ChatChunk, ChatResult, SessionNotFoundError, Usage


class FakeEngine:
    """Replies "ok" in two chunks; records every call's session and options; tracks sessions by name."""

    model_name = "fake-model"
    context_window = 2048
    tokenizer = SimpleNamespace(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.sessions: dict[str, int] = {}

    def _result(self, session_id: str, namespace: str | None, messages: Any, options: dict[str, Any]) -> ChatResult:
        self.calls.append({"session_id": session_id, "namespace": namespace, "messages": list(messages), **options})
        self.sessions[session_id] = self.sessions.get(session_id, 0) + 1
        usage = Usage(prompt_tokens=5, completion_tokens=2, written_tokens=9, full_context_tokens=5)
        return ChatResult("ok", "stop", usage, session_id, namespace or "default", self.sessions[session_id])

    def stream(self, session_id: str, messages: Any, *, namespace: str | None = None, **options: Any):
        result = self._result(session_id, namespace, messages, options)

        def chunks():
            yield ChatChunk("o", session_id)
            yield ChatChunk("k", session_id)
            yield ChatChunk("", session_id, finish_reason="stop", usage=result.usage, result=result)

        return chunks()

    async def astream(self, session_id: str, messages: Any, **options: Any):
        for chunk in self.stream(session_id, messages, **options):
            yield chunk

    def delete(self, session_id: str, *, namespace: str | None = None) -> None:
        if self.sessions.pop(session_id, None) is None:
            raise SessionNotFoundError(session_id)

    def get_session(self, session_id: str, *, namespace: str | None = None) -> Any:
        if session_id not in self.sessions:
            raise SessionNotFoundError(session_id)
        return SimpleNamespace(session_id=session_id, turn=self.sessions[session_id])
