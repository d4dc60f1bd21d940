"""``/v1/responses``: OpenAI's Responses API over persistent sessions.

A Responses client sends only the **new** input each call, so the engine is called with ``history="append"``.
Which session a response runs in:

* ``previous_response_id``: the session that response left. When it is still the session's latest turn, the
  session simply continues (hot KV cache). When the session has moved on since, the session is **forked** at
  that response's turn and the new response continues the fork, so the original conversation is untouched
  (OpenAI's semantics: any stored response can be branched from).
* ``conversation`` (or the ``X-Session-ID`` header): that session; a conversation must exist.
* neither: a new session whose id is the response's id.
* ``store: false``: a throwaway session (nothing persisted, no response id recorded). With a
  ``previous_response_id`` the throwaway starts as a copy of that turn (export, then import into the
  throwaway engine), so the stored session is not touched either.

Every stored response is a row of :mod:`.response_ids` (its session, turn and body), so ``GET`` works in any
worker and after a restart. ``status`` is always ``"completed"`` (an answer cut at ``max_output_tokens`` too;
OpenAI would say ``"incomplete"``), and the body carries the ``deltamem`` object of the completions endpoints.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .completions import SESSION_HEADER, Turn
from .errors import APIError, engine_errors, to_api_error
from .response_ids import ResponseStore, response_store
from .schemas import ConversationRef
from .session_choice import SessionChoice, choose_session
from .state import ServerState, TenantDep, server_state
from .streaming import OpenStream, SSEResponse

__all__ = ["ResponseRequest", "function_call_item", "input_messages", "message_item", "router"]

router = APIRouter(prefix="/v1/responses")

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


def _item_text(content: Any, where: str) -> str:
    """An item's content as one string: a string, or a list of text parts (other parts cannot be run)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of input_text parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{where}: only text content parts are supported, not {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call`` item as a ``tool_calls`` entry of an assistant message."""
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a function_call needs call_id and name")
    if not isinstance(arguments, str):
        raise ValueError(f"{where}: function_call arguments must be a JSON string")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def input_messages(items: str | list[Any], *, outputs_need_calls: bool = False) -> list[dict[str, Any]]:
    """Responses ``input`` as engine messages: a string, message items (``{"role", "content"}`` /
    ``{"type": "message", …}``), ``function_call`` items (the assistant's calls: merged into the assistant
    message before them) and ``function_call_output`` items (tool messages). Raises ``ValueError`` for anything
    else (images, files, reasoning items…), and — with ``outputs_need_calls`` (a new chain, whose input must
    hold the calls) — for a ``function_call_output`` whose call is not in ``input``."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
        if kind == "function_call":
            call = _function_call(item, where)
            calls.add(call["id"])
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise ValueError(f"{where}: a function_call_output needs call_id")
            if outputs_need_calls and call_id not in calls:
                raise ValueError(f"{where}: no function_call with call_id {call_id!r} before this output (send it "
                                 "in input, or continue with previous_response_id or conversation)")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _item_text(output, where)})
            continue
        if kind != "message":
            raise ValueError(f"{where}: only message, function_call and function_call_output items are "
                             f"supported, not {kind!r}")
        role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise ValueError(f"{where}: role must be one of {sorted(_ROLES)}")
        out.append({"role": role, "content": _item_text(item.get("content"), where)})
    return out


def function_call_item(item_id: str, call: Any, status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` output item for a parsed call (``call_id`` is the call's id, as chat completions)."""
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def _chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses' flat function tools as chat-template tools (``{"type": "function", "function": {…}}``)."""
    out = []
    for tool in tools:
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def message_item(item_id: str, role: str, text: str, status: str | None = "completed") -> dict[str, Any]:
    """A message item: assistant text is ``output_text`` (with ``annotations``), anything else ``input_text``."""
    if role == "assistant":
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    else:
        part = {"type": "input_text", "text": text}
    item: dict[str, Any] = {"type": "message", "id": item_id, "role": role, "content": [part]}
    if status is not None:
        item["status"] = status
    return item


class ResponseRequest(BaseModel):
    """``POST /v1/responses``. Unknown fields (``reasoning``, ``text``, ``user``…) are ignored. ``tools``:
    function tools only (rendered by the chat template; ``tool_choice: "none"`` leaves them out)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("input")
    @classmethod
    def _messages(cls, value: str | list[Any]) -> str | list[Any]:
        if not input_messages(value):
            raise ValueError("input must not be empty")
        return value

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(value or []):
            if tool.get("type") != "function":
                raise ValueError(f"tools[{i}]: only function tools are supported, not {tool.get('type')!r}")
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise ValueError(f"tools[{i}]: a function tool needs a name")
        return value

    def engine_tools(self) -> list[dict[str, Any]] | None:
        """The tools offered this turn, as the chat template takes them (``None``: none, or ``tool_choice`` none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return _chat_tools(self.tools)

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c.id if isinstance(c, ConversationRef) else c

    def engine_messages(self) -> list[dict[str, Any]]:
        # instructions apply to this turn: a system message before its input (it stays in the session's history)
        head = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return head + input_messages(self.input)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


def not_found(response_id: str) -> APIError:
    return APIError(404, f"no response with id {response_id!r}", param="response_id", code="response_not_found")


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with engine_errors():
        return await asyncio.to_thread(fn, *args, **kwargs)


async def _continue_or_fork(engine: Any, ids: ResponseStore, namespace: str, response_id: str) -> str:
    """The session a new response after ``response_id`` runs in: its own session if that response is still the
    latest turn, else a fork at its turn (the original stays as it is)."""
    record = await asyncio.to_thread(ids.get, namespace, response_id)
    if record is None:
        raise not_found(response_id)
    info = await _call(engine.get_session, record.session_id, namespace=namespace)
    if info.turn == record.turn:
        return record.session_id
    fork = await _call(engine.fork, record.session_id, _new_id("sess_"), namespace=namespace, turn=record.turn)
    return fork.session_id


async def _throwaway_copy(state: ServerState, ids: ResponseStore, namespace: str, response_id: str) -> str:
    """``store: false`` after a stored response: a throwaway session holding that response's turn."""
    record = await asyncio.to_thread(ids.get, namespace, response_id)
    if record is None:
        raise not_found(response_id)
    with tempfile.TemporaryDirectory(prefix="deltamem-resp-") as tmp:
        path = Path(tmp) / "s.safetensors"
        await _call(state.engine.export_session, record.session_id, path, namespace=namespace, turn=record.turn)
        info = await _call(state.throwaway.import_session, path, "tmp-" + secrets.token_hex(16), namespace=namespace)
    return info.session_id


class _Shape:
    """What every body and event of one response repeats."""

    def __init__(self, state: ServerState, body: ResponseRequest, response_id: str, conversation: str | None) -> None:
        self.id, self.msg_id, self.created = response_id, _new_id("msg_"), int(time.time())
        self.model = state.engine.model_name
        self.request = body
        self.conversation = {"id": conversation} if conversation else None
        self._call_item_ids: dict[str, str] = {}

    def body(self, status: str, output: list[dict[str, Any]], result: Any = None,
             extension: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.request
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "tool_choice": "auto" if req.tool_choice is None else req.tool_choice, "tools": req.tools or [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled", "store": req.store, "metadata": req.metadata or {},
            "previous_response_id": req.previous_response_id, "conversation": self.conversation,
            "usage": _usage(result.usage) if result is not None else None,
        }  # fmt: skip
        if extension is not None:
            out["deltamem"] = extension
        return out

    def item(self, text: str, status: str = "completed") -> dict[str, Any]:
        return message_item(self.msg_id, "assistant", text, status)

    def call_item(self, call: Any, status: str = "completed") -> dict[str, Any]:
        item_id = self._call_item_ids.setdefault(call.id, _new_id("fc_"))
        return function_call_item(item_id, call, status)

    def output(self, result: Any) -> list[dict[str, Any]]:
        """The output items: the assistant message (when it has text, or there are no calls), then one
        ``function_call`` item per parsed call."""
        content = (result.content or "") if result.tool_calls else result.text
        items = [self.item(content)] if content or not result.tool_calls else []
        return items + [self.call_item(call) for call in result.tool_calls]


def _usage(usage: Any) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }  # fmt: skip


async def _record(ids: ResponseStore, turn: Turn, result: Any, body: dict[str, Any]) -> None:
    if not turn.choice.throwaway:
        await _call(ids.put, turn.namespace, turn.session_id, result.turn, body)


@router.post("")
async def create_response(body: ResponseRequest, request: Request, tenant: TenantDep) -> Response:
    state = server_state(request)
    ids = response_store(request.app.state, state.engine.store)
    ns = tenant.namespace
    header = request.headers.get(SESSION_HEADER)
    if body.previous_response_id is not None and (body.conversation_id is not None or header):
        raise APIError(422, "previous_response_id cannot be combined with conversation or X-Session-ID",
                       param="previous_response_id", code="invalid_value")
    if body.previous_response_id is None and body.conversation_id is None and not header:
        try:  # a new chain: a function_call_output must answer a call sent along in input
            input_messages(body.input, outputs_need_calls=True)
        except ValueError as exc:
            raise APIError(422, str(exc), param="input", code="invalid_value") from exc
    response_id = _new_id("resp_")
    options: dict[str, Any] = {"max_new_tokens": body.max_output_tokens, "temperature": body.temperature,
                               "top_p": body.top_p}
    tools = body.engine_tools()
    if tools:
        options["tools"] = tools
    copy_id = None
    if not body.store:
        if body.conversation_id is not None or header:
            raise APIError(422, "store=false runs in a throwaway session: it cannot write to a conversation",
                           param="store", code="invalid_value")
        choice = SessionChoice(None)
        if body.previous_response_id is not None:
            copy_id = await _throwaway_copy(state, ids, ns, body.previous_response_id)
    else:
        previous = None
        if body.previous_response_id is not None:
            previous = await _continue_or_fork(state.engine, ids, ns, body.previous_response_id)
        choice = choose_session(header, None, body.conversation_id, previous)
        if choice.throwaway:  # a new chain: its session is named after its first response
            choice = SessionChoice(response_id, "response")
        if choice.source == "conversation":
            options["create_if_missing"] = False  # a conversation is created by POST /v1/conversations
    turn = Turn(state, choice, ns, body.engine_messages(), options, "append", "/v1/responses")
    if copy_id is not None:
        turn.session_id = copy_id  # the throwaway copy (discarded with the request, as any throwaway)
    shape = _Shape(state, body, response_id, choice.session_id if choice.source == "conversation" else None)
    if body.stream:
        handle = await turn.open_stream()
        parse = state.engine.tool_call_format if tools else None
        return SSEResponse(_events(handle, turn, shape, ids, parse, tools), handle, headers=turn.headers())
    result, extension = await turn.run()
    out = shape.body("completed", shape.output(result), result, extension)
    await _record(ids, turn, result, out)
    return JSONResponse(out, headers=turn.headers(extension["session_version"]))


def _event(seq: itertools.count, type_: str, **fields: Any) -> bytes:
    """One typed event: ``event: <type>`` and its JSON (which repeats the type and numbers the event)."""
    data = {"type": type_, "sequence_number": next(seq), **fields}
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {type_}\ndata: {payload}\n\n".encode()


async def _events(handle: OpenStream, turn: Turn, shape: _Shape, ids: ResponseStore, tool_format: Any = None,
                  tools: Any = None) -> AsyncIterator[bytes]:
    """The Responses event sequence of one turn. The response is recorded before ``response.completed``, so a
    client may continue from it as soon as it has the id. An error after the first token is one ``error``
    event (with an ``error`` object too, which OpenAI's client raises).

    With tools (and a template that has a call format) the text is parsed as it streams: only settled content
    is sent (never part of a call), the message item opens with its first text (and not at all for a reply
    that is only calls), and each call follows as a ``function_call`` item with its arguments."""
    seq = itertools.count()
    where = {"item_id": shape.msg_id, "output_index": 0, "content_index": 0}
    opened = False

    def open_message() -> list[bytes]:
        return [
            _event(seq, "response.output_item.added", output_index=0,
                   item={**shape.item("", "in_progress"), "content": []}),
            _event(seq, "response.content_part.added", **where,
                   part={"type": "output_text", "text": "", "annotations": []}),
        ]

    try:
        opening = shape.body("in_progress", [])
        yield _event(seq, "response.created", response=opening)
        yield _event(seq, "response.in_progress", response=opening)
        if tool_format is None:
            for event in open_message():
                yield event
            opened = True
        chunk, raw, sent = handle.first, "", ""
        while True:
            if chunk.text:  # the engine may hand over empty chunks while it holds back a possible stop string
                if tool_format is None:
                    delta = chunk.text
                else:
                    raw += chunk.text
                    settled = tool_format.settled_content(raw, tools)
                    delta = settled[len(sent) :] if settled.startswith(sent) else ""
                if delta:
                    if not opened:
                        for event in open_message():
                            yield event
                        opened = True
                    sent += delta
                    yield _event(seq, "response.output_text.delta", **where, delta=delta, logprobs=[])
            if chunk.result is not None:
                break
            chunk = await handle.next()
        result = chunk.result
        extension = await turn.finish(result)
        content = (result.content or "") if result.tool_calls else result.text
        rest = content[len(sent) :] if content.startswith(sent) else ""
        if (rest or not result.tool_calls) and not opened:
            for event in open_message():
                yield event
            opened = True
        if rest:
            sent += rest
            yield _event(seq, "response.output_text.delta", **where, delta=rest, logprobs=[])
        output = shape.output(result)
        final = shape.body("completed", output, result, extension)
        await _record(ids, turn, result, final)
        if opened:
            item = output[0]
            yield _event(seq, "response.output_text.done", **where, text=sent, logprobs=[])
            yield _event(seq, "response.content_part.done", **where, part=item["content"][0])
            yield _event(seq, "response.output_item.done", output_index=0, item=item)
        for index, call in enumerate(result.tool_calls, start=1 if opened else 0):
            item = shape.call_item(call)
            at = {"item_id": item["id"], "output_index": index}
            yield _event(seq, "response.output_item.added", output_index=index,
                         item={**item, "arguments": "", "status": "in_progress"})
            yield _event(seq, "response.function_call_arguments.delta", **at, delta=call.arguments)
            yield _event(seq, "response.function_call_arguments.done", **at, name=call.name,
                         arguments=call.arguments)
            yield _event(seq, "response.output_item.done", output_index=index, item=item)
        yield _event(seq, "response.completed", response=final)
    except Exception as exc:  # noqa: BLE001 - becomes an error event; unexpected ones are logged there
        err = to_api_error(exc, engine_call=True)
        yield _event(seq, "error", code=err.code, message=err.message, param=err.param, error=err.body()["error"])
    finally:
        await handle.close()


@router.get("/{response_id}")
async def get_response(response_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    ids = response_store(request.app.state, server_state(request).engine.store)
    record = await _call(ids.get, tenant.namespace, response_id)
    if record is None:
        raise not_found(response_id)
    return record.body


@router.delete("/{response_id}")
async def delete_response(response_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    """Forget the response id (its session and the turn it wrote stay)."""
    ids = response_store(request.app.state, server_state(request).engine.store)
    if not await _call(ids.delete, tenant.namespace, response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
