"""``/v1/conversations`` with the real ``openai`` client: create (seeded), retrieve, items, responses in a
conversation, delete, tenants, errors."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import assert_error_shape

SEED = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "My name is Ada."}]}]


def _texts(items):
    return [(i.role, i.content[0].type, i.content[0].text) for i in items]


def test_create_seed_and_list_items(live):
    client = live.client()
    conv = client.conversations.create(items=SEED, metadata={"topic": "names"})
    assert conv.id.startswith("conv_") and conv.object == "conversation" and conv.metadata == {"topic": "names"}
    assert client.conversations.retrieve(conv.id).id == conv.id
    info = live.engine.get_session(conv.id)  # backed by a session of the same id, seeded without a turn of chat
    assert info.turn == 1
    items = client.conversations.items.list(conv.id, order="asc")
    assert _texts(items.data) == [("user", "input_text", "My name is Ada.")]
    assert items.data[0].id == "msg_0" and items.has_more is False


def test_responses_run_in_the_conversation(live):
    client = live.client()
    conv = client.conversations.create(items=SEED)
    r = client.responses.create(model="m", input="What is my name?", conversation=conv.id, max_output_tokens=8)
    assert r.conversation.id == conv.id and r.deltamem["session_id"] == conv.id
    r2 = client.responses.create(model="m", input="Again?", conversation={"id": conv.id}, max_output_tokens=8)
    assert r2.usage.input_tokens_details.cached_tokens > 0
    items = client.conversations.items.list(conv.id, order="asc").data
    assert _texts(items) == [
        ("user", "input_text", "My name is Ada."), ("user", "input_text", "What is my name?"),
        ("assistant", "output_text", r.output_text), ("user", "input_text", "Again?"),
        ("assistant", "output_text", r2.output_text),
    ]
    newest_first = client.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in newest_first.data] == ["msg_4", "msg_3"] and newest_first.has_more is True
    assert [i.id for i in client.conversations.items.list(conv.id, after="msg_1").data] == ["msg_0"]


def test_add_items(live):
    client = live.client()
    conv = client.conversations.create()
    assert live.engine.get_session(conv.id).turn == 0
    added = client.conversations.items.create(conv.id, items=[
        {"role": "user", "content": "I live in Paris."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Noted."}]},
    ])
    assert _texts(added.data) == [("user", "input_text", "I live in Paris."),
                                  ("assistant", "output_text", "Noted.")]
    assert [i.id for i in added.data] == ["msg_0", "msg_1"]
    more = client.conversations.items.create(conv.id, items=[{"role": "user", "content": "And Rome."}])
    assert [i.id for i in more.data] == ["msg_2"]
    assert len(client.conversations.items.list(conv.id).data) == 3


def test_delete(live):
    client = live.client()
    conv = client.conversations.create(items=SEED)
    r = client.responses.create(model="m", input="Hi.", conversation=conv.id, max_output_tokens=4)
    deleted = client.conversations.delete(conv.id)
    assert deleted.id == conv.id and deleted.deleted is True
    assert not live.engine.store.exists(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)  # its responses went with it


def test_errors(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError):  # a conversation must be created first
        client.responses.create(model="m", input="hi", conversation="conv_nobody", max_output_tokens=4)
    assert not live.engine.store.exists("conv_nobody")
    with httpx.Client(base_url=live.url, timeout=60) as http:
        missing = {"get": http.get("/v1/conversations/conv_nobody"),
                   "items": http.get("/v1/conversations/conv_nobody/items"),
                   "add": http.post("/v1/conversations/conv_nobody/items", json={"items": SEED}),
                   "delete": http.delete("/v1/conversations/conv_nobody")}
        invalid = {"bad id": http.get("/v1/conversations/bad id!"),
                   "image": http.post("/v1/conversations", json={"items": [
                       {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
                   "no items": http.post("/v1/conversations/conv_x/items", json={"items": []}),
                   "order": http.get("/v1/conversations/conv_x/items?order=sideways")}
    for what, response in missing.items():
        assert response.status_code == 404, what
        assert_error_shape(response.content, code="session_not_found")
    for what, response in invalid.items():
        assert response.status_code == 422, what
        assert_error_shape(response.content)


def test_conversations_are_per_tenant(tenants):
    live, keys = tenants
    acme, globex = live.client(keys["acme"]), live.client(keys["globex"])
    conv = acme.conversations.create(items=SEED)
    assert live.engine.store.exists(conv.id, namespace="acme")
    for attempt in (lambda: globex.conversations.retrieve(conv.id),
                    lambda: globex.conversations.items.list(conv.id),
                    lambda: globex.conversations.items.create(conv.id, items=SEED),
                    lambda: globex.conversations.delete(conv.id),
                    lambda: globex.responses.create(model="m", input="hi", conversation=conv.id,
                                                    max_output_tokens=4)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert not live.engine.store.exists(conv.id, namespace="globex")
    assert _texts(acme.conversations.items.list(conv.id).data) == [("user", "input_text", "My name is Ada.")]
