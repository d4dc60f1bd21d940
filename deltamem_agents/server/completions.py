"""``POST /v1/chat/completions`` and ``POST /v1/completions``: one engine turn each, streamed or not.

* Chat completions send the request's messages as the **whole** conversation (``history="full"``): clients
  resend their history every call, the engine skips what the session already holds (and replays after an
  edit). The ``history: "append"`` extension says the messages only follow what the session holds.
* Completions send ``prompt`` as one user message: to a throwaway session, or appended to the named session
  (``history="append"``, since the prompt is a new turn and not a resent conversation).
* A chat history that diverges from what the session holds (another client wrote after this one's last view,
  an edit, a "regenerate") is a 409 ``history_conflict`` unless the request says ``on_divergence: "rollback"``
  (body field, or the ``X-DeltaMem-On-Divergence`` header), or the server runs with ``--on-divergence
  rollback`` (``docs/server.md``).

The turn runs off the event loop (``engine.achat`` / ``engine.astream`` use worker threads) inside an admission
ticket (:mod:`.limits`). Response headers: ``X-Session-ID`` and, when not streamed, ``X-Session-Version`` (the
version after the turn; a streamed response has sent its headers before the turn ends, so its last chunk's
``deltamem`` object carries it). A throwaway session has neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from . import bodies
from .errors import APIError, engine_errors
from .schemas import ChatCompletionRequest, CompletionRequest
from .session_choice import SessionChoice, choose_session, new_throwaway_id
from .state import ServerState, TenantDep, server_state
from .streaming import OpenStream, SSEResponse, sse_events

__all__ = ["router"]

logger = logging.getLogger("deltamem_agents.server")

router = APIRouter()

SESSION_HEADER = "X-Session-ID"
VERSION_HEADER = "X-Session-Version"
DIVERGENCE_HEADER = "X-DeltaMem-On-Divergence"
_POLICIES = ("reject", "rollback")


def on_divergence(state: ServerState, header: str | None, field: str | None) -> str:
    """The request's divergence policy: the ``X-DeltaMem-On-Divergence`` header or the ``on_divergence`` body
    field (they must agree when both are given), else the server's ``on_divergence`` setting."""
    if header is not None and header.strip():
        value = header.strip().lower()
        if value not in _POLICIES:
            raise APIError(422, f"the {DIVERGENCE_HEADER} header must be reject or rollback, got {header!r}",
                           param=DIVERGENCE_HEADER, code="invalid_value")
        if field is not None and field != value:
            raise APIError(422, f"the {DIVERGENCE_HEADER} header ({value!r}) and the on_divergence field "
                           f"({field!r}) disagree", param="on_divergence", code="invalid_value")
        return value
    return field or state.settings.on_divergence


@dataclass
class Turn:
    """One engine call: which engine (the real one, or the throwaway twin), session, messages and options."""

    state: ServerState
    choice: SessionChoice
    namespace: str
    messages: list[dict[str, Any]]
    options: dict[str, Any]
    history: str
    route: str
    engine: Any = None
    session_id: str = ""
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.choice.throwaway:
            self.engine, self.session_id = self.state.throwaway, new_throwaway_id()
        else:
            self.engine, self.session_id = self.state.engine, str(self.choice.session_id)

    @property
    def visible_id(self) -> str | None:
        """The id the client may use again (``None``: throwaway)."""
        return None if self.choice.throwaway else self.session_id

    def kwargs(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "history": self.history, **self.options}

    def headers(self, version: int | None = None) -> dict[str, str]:
        if self.choice.throwaway:
            return {}
        out = {SESSION_HEADER: self.session_id}
        if version is not None:
            out[VERSION_HEADER] = str(version)
        return out

    async def version(self) -> int | None:
        """The session's version after the turn (``None`` when it is a throwaway or already gone)."""
        if self.choice.throwaway:
            return None
        try:
            info = await asyncio.to_thread(self.engine.get_session, self.session_id, namespace=self.namespace)
        except Exception:  # noqa: BLE001 - deleted meanwhile: the turn itself succeeded
            return None
        return info.version

    async def discard(self) -> None:
        """Delete a throwaway session from the private store (it may not exist: an early error)."""
        if not self.choice.throwaway:
            return

        def delete() -> None:
            with contextlib.suppress(Exception):
                self.engine.delete(self.session_id, namespace=self.namespace)

        # A thread of its own, not awaited under cancellation: the delete waits for the session's lock, which
        # the engine's worker holds until it noticed a closed stream.
        await asyncio.shield(asyncio.to_thread(delete))

    async def finish(self, result: Any) -> dict[str, Any]:
        """After the commit: count tokens, read the version, build the ``deltamem`` extension."""
        self.state.metrics.observe_usage(result.usage)
        version = await self.version()
        return bodies.deltamem_extension(result, self.visible_id, version)

    async def run(self) -> tuple[Any, dict[str, Any]]:
        """The whole turn, not streamed: ``(ChatResult, extension)``."""
        ticket = self.state.limiter.admit()
        try:
            await ticket.start()
            with engine_errors():
                result = await self.engine.achat(self.session_id, self.messages, **self.kwargs())
        finally:
            ticket.release()
            await self.discard()
        return result, await self.finish(result)

    async def open_stream(self) -> OpenStream:
        """Start a streamed turn and wait for its first chunk (errors before it are still HTTP statuses)."""
        ticket = self.state.limiter.admit()
        stream = None

        async def release() -> None:
            ticket.release()
            await self.discard()

        try:
            await ticket.start()
            with engine_errors():
                stream = self.engine.astream(self.session_id, self.messages, **self.kwargs())
                first = await stream.__anext__()
        except BaseException:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            await release()
            raise
        self.state.metrics.first_token.labels(self.route).observe(time.perf_counter() - self.started)
        return OpenStream(stream, first, release)


def _model_name(state: ServerState) -> str:
    return state.engine.model_name


def _ids(state: ServerState, prefix: str) -> bodies.CallIds:
    return bodies.CallIds.new(prefix, _model_name(state), state.engine.fingerprints["adapter"])


# ---------------------------------------------------------------------------------------------- chat
class _ChatFormat:
    """Chat chunks. With ``tools`` (and a chat template that has a call format) the text is parsed for tool
    calls as it streams: only the content that is settled (``ToolCallFormat.settled_content``) is sent, so a
    call — or half of its opening tag — is never sent as text; the calls follow at the end as ``tool_calls``
    deltas, with the ids the engine gave them (and wrote into the session)."""

    def __init__(self, ids: bodies.CallIds, include_usage: bool, tool_format: Any = None, tools: Any = None) -> None:
        self.ids, self.include_usage = ids, include_usage
        self.tool_format = tool_format if tools else None
        self.tools = tools
        self.text = ""  # raw text so far
        self.sent = ""  # content sent so far

    def _chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None, **kwargs: Any) -> dict[str, Any]:
        return bodies.chat_chunk(self.ids, delta, finish_reason, include_usage=self.include_usage, **kwargs)

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def _send_upto(self, content: str) -> list[dict[str, Any]]:
        if not content.startswith(self.sent):  # cannot happen (settled content only grows); never resend text
            logger.warning("tool call parsing: settled content diverged from what was sent; not sending more")
            return []
        delta, self.sent = content[len(self.sent) :], content
        return [self._chunk({"content": delta})] if delta else []

    def content(self, text: str) -> list[dict[str, Any]]:
        if self.tool_format is None:
            return [self._chunk({"content": text})]
        self.text += text
        return self._send_upto(self.tool_format.settled_content(self.text, self.tools))

    def closing(self, text: str, finish_reason: str, result: Any, extension: dict[str, Any]) -> list[dict[str, Any]]:
        if self.tool_format is None:
            events = [self._chunk({"content": text} if text else {}, finish_reason, extension=extension)]
        else:
            events = self._send_upto((result.content or "") if result.tool_calls else result.text)
            for index, call in enumerate(result.tool_calls):
                events += [self._chunk({"tool_calls": [delta]}) for delta in bodies.tool_call_deltas(index, call)]
            events.append(self._chunk({}, finish_reason, extension=extension))
        if self.include_usage:
            events.append(self._chunk(None, usage=result.usage))
        return events


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           tenant: TenantDep) -> Response:
    state = server_state(request)
    choice = choose_session(request.headers.get(SESSION_HEADER), body.session_id, body.conversation_id)
    options = {**body.engine_options(),
               "on_divergence": on_divergence(state, request.headers.get(DIVERGENCE_HEADER), body.on_divergence)}
    turn = Turn(state, choice, tenant.namespace, body.engine_messages(), options, body.history,
                "/v1/chat/completions")
    ids = _ids(state, "chatcmpl")
    if body.stream:
        handle = await turn.open_stream()
        fmt = _ChatFormat(ids, body.include_usage, state.engine.tool_call_format, body.engine_options().get("tools"))
        events = sse_events(handle, fmt, turn.finish)
        return SSEResponse(events, handle, headers=turn.headers())
    result, extension = await turn.run()
    return JSONResponse(bodies.chat_completion_body(ids, result, extension),
                        headers=turn.headers(extension["session_version"]))


# ---------------------------------------------------------------------------------------------- completions
class _CompletionFormat:
    def __init__(self, ids: bodies.CallIds, include_usage: bool, echo: str | None) -> None:
        self.ids, self.include_usage, self.echo = ids, include_usage, echo

    def opening(self) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [bodies.completion_chunk(self.ids, self.echo, include_usage=self.include_usage)]

    def content(self, text: str) -> list[dict[str, Any]]:
        return [bodies.completion_chunk(self.ids, text, include_usage=self.include_usage)]

    def closing(self, text: str, finish_reason: str, result: Any, extension: dict[str, Any]) -> list[dict[str, Any]]:
        events = [bodies.completion_chunk(self.ids, text, finish_reason, include_usage=self.include_usage,
                                          extension=extension)]
        if self.include_usage:
            events.append(bodies.completion_chunk(self.ids, None, include_usage=True, usage=result.usage))
        return events


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      tenant: TenantDep) -> Response:
    state = server_state(request)
    choice = choose_session(request.headers.get(SESSION_HEADER), body.session_id, body.conversation_id)
    prompt = body.prompt_text
    turn = Turn(state, choice, tenant.namespace, [{"role": "user", "content": prompt}], body.engine_options(),
                "append", "/v1/completions")
    ids = _ids(state, "cmpl")
    if body.stream:
        handle = await turn.open_stream()
        fmt = _CompletionFormat(ids, body.include_usage, prompt if body.echo else None)
        return SSEResponse(sse_events(handle, fmt, turn.finish), handle, headers=turn.headers())
    result, extension = await turn.run()
    text = (prompt + result.text) if body.echo else result.text
    return JSONResponse(bodies.completion_body(ids, text, result, extension),
                        headers=turn.headers(extension["session_version"]))
