"""``/v1/conversations``: OpenAI's conversation objects, each one a session whose id is the conversation id.

``POST /v1/responses`` with ``conversation=<id>`` runs in it. Items are the messages the session still keeps as
text (the stored window, ``store.load(...).window``): the state remembers older messages, but not verbatim, so
they cannot be listed. Item ids are ``msg_<index>``, the message's position in the conversation. Everything runs
in the caller's namespace; another tenant's conversation is a 404, like an id nobody uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import engine_errors
from .response_ids import response_store
from .responses import input_messages, message_item
from .session_choice import choose_session
from .sessions_api import session_object
from .state import TenantDep, server_state

__all__ = ["ConversationCreate", "ItemsCreate", "router"]

router = APIRouter(prefix="/v1/conversations")


def _checked_items(value: list[Any] | None) -> list[Any] | None:
    if value:
        input_messages(value)  # refuse what cannot be written before anything is created
    return value


class ConversationCreate(BaseModel):
    """``POST /v1/conversations``: optional seed ``items`` (message items, as ``input``) and ``metadata``."""

    model_config = ConfigDict(extra="allow")

    items: list[Any] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("items")
    @classmethod
    def _items(cls, value: list[Any] | None) -> list[Any] | None:
        return _checked_items(value)


class ItemsCreate(BaseModel):
    """``POST /v1/conversations/{id}/items``: the messages to append."""

    model_config = ConfigDict(extra="allow")

    items: list[Any] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _items(cls, value: list[Any]) -> list[Any]:
        return _checked_items(value) or value


def conversation_object(info: Any) -> dict[str, Any]:
    s = session_object(info)
    return {"id": s["id"], "object": "conversation", "created_at": s["created_at"], "metadata": s["metadata"]}


def _item(window_message: Any) -> dict[str, Any]:
    return message_item(f"msg_{window_message.index}", window_message.role, window_message.content)


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with engine_errors():
        return await asyncio.to_thread(fn, *args, **kwargs)


def _id(conversation_id: str) -> str:
    return str(choose_session(None, None, conversation_id).session_id)  # the same id check as everywhere


@router.post("")
async def create_conversation(body: ConversationCreate, request: Request, tenant: TenantDep) -> dict[str, Any]:
    engine = server_state(request).engine
    cid = "conv_" + secrets.token_hex(24)
    info = await _call(engine.create_session, cid, namespace=tenant.namespace, metadata=body.metadata or {})
    if body.items:
        try:
            await _call(engine.write, cid, input_messages(body.items), namespace=tenant.namespace,
                        history="append", create_if_missing=False)
        except BaseException:
            # a conversation whose seed items were refused (too long, …) is not left behind half made
            with contextlib.suppress(Exception):
                await asyncio.to_thread(engine.delete, cid, namespace=tenant.namespace)
            raise
    return conversation_object(info)


@router.get("/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    engine = server_state(request).engine
    return conversation_object(await _call(engine.get_session, _id(conversation_id), namespace=tenant.namespace))


@router.delete("/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    """Delete the session, and the ids of the responses that ran in it (they could only lead to a 404)."""
    state = server_state(request)
    cid = _id(conversation_id)
    await _call(state.engine.delete, cid, namespace=tenant.namespace)
    ids = response_store(request.app.state, state.engine.store)
    await _call(ids.delete_session, tenant.namespace, cid)
    return {"id": cid, "object": "conversation.deleted", "deleted": True}


def _page(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


@router.get("/{conversation_id}/items")
async def list_items(conversation_id: str, request: Request, tenant: TenantDep,
                     limit: Annotated[int, Query(ge=1, le=100)] = 20,
                     order: Annotated[Literal["asc", "desc"], Query()] = "desc",
                     after: Annotated[str | None, Query()] = None) -> dict[str, Any]:
    """The kept messages, newest first by default (as OpenAI lists items); ``after`` is an item id."""
    engine = server_state(request).engine
    data = await _call(engine.store.load, _id(conversation_id), namespace=tenant.namespace)
    items = [_item(w) for w in data.window]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return _page(items[:limit], len(items) > limit)


@router.post("/{conversation_id}/items")
async def add_items(conversation_id: str, body: ItemsCreate, request: Request, tenant: TenantDep) -> dict[str, Any]:
    """Append messages (written into the session, no answer generated); returns the added items."""
    engine = server_state(request).engine
    cid = _id(conversation_id)
    messages = input_messages(body.items)
    await _call(engine.write, cid, messages, namespace=tenant.namespace, history="append", create_if_missing=False)
    data = await _call(engine.store.load, cid, namespace=tenant.namespace)
    first_new = data.record.count - len(messages)
    return _page([_item(w) for w in data.window if w.index >= first_new])
