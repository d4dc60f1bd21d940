"""``/v1/responses`` with the real ``openai`` client: new chains, ``previous_response_id`` continuing (hot KV
cache) or forking (an older response), ``store: false``, retrieve/delete, streaming events, tenants, errors."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import assert_error_shape

QUESTION = "Remember: the launch code is 4471."


def _create(client, **kwargs):
    kwargs.setdefault("max_output_tokens", 8)
    return client.responses.create(model="m", **kwargs)


def test_create_returns_a_response_object(live):
    r = _create(live.client(), input=QUESTION)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.model == live.engine.model_name
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    assert r.output_text == item.content[0].text  # computed by the client
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens <= 8
    assert u.input_tokens_details.cached_tokens == 0 and u.output_tokens_details.reasoning_tokens == 0
    assert r.previous_response_id is None and r.conversation is None
    # a new chain's session is named after its first response
    assert r.deltamem["session_id"] == r.id and live.engine.get_session(r.id).turn == 1


def test_input_items_and_instructions(live):
    r = _create(live.client(), instructions="Answer briefly.", input=[
        {"role": "user", "content": "Hello."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Code 4471."}]},
    ])
    window = live.engine.store.load(r.id).window
    assert [(w.role, w.content) for w in window[:3]] == [
        ("system", "Answer briefly."), ("user", "Hello."), ("user", "Code 4471.")]
    assert window[-1].role == "assistant" and window[-1].content == r.output_text


def test_previous_response_id_continues_the_session(live):
    client = live.client()
    first = _create(client, input=QUESTION)
    second = _create(client, input="What is the launch code?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.deltamem["session_id"] == first.id
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's KV cache was continued
    assert live.engine.get_session(first.id).turn == 2
    roles = [w.role for w in live.engine.store.load(first.id).window]
    assert roles == ["user", "assistant", "user", "assistant"]  # only the new input was sent, and appended


def test_an_older_response_id_forks(live):
    client = live.client()
    first = _create(client, input=QUESTION)
    _create(client, input="Second question.", previous_response_id=first.id)
    version = live.engine.get_session(first.id).version
    branch = _create(client, input="Another second question.", previous_response_id=first.id)
    fork = branch.deltamem["session_id"]
    assert fork != first.id
    assert live.engine.get_session(first.id).version == version  # the original is untouched
    assert live.engine.get_session(fork).turn == 2
    window = live.engine.store.load(fork).window
    assert window[2].content == "Another second question." and len(window) == 4
    # the branch continues like any chain: its latest response continues the fork in place
    third = _create(client, input="And then?", previous_response_id=branch.id)
    assert third.deltamem["session_id"] == fork and live.engine.get_session(fork).turn == 3


def test_store_false_persists_nothing(live):
    client = live.client()
    before = {s.session_id for s in live.engine.list_sessions(limit=1000)}
    r = _create(client, input=QUESTION, store=False)
    assert r.output_text == r.output[0].content[0].text and r.deltamem["session_id"] is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    # store=false after a stored response runs on a copy of that turn: the stored session stays as it was
    stored = _create(client, input=QUESTION)
    version = live.engine.get_session(stored.id).version
    _create(client, input="What is the code?", previous_response_id=stored.id, store=False)
    assert live.engine.get_session(stored.id).version == version
    after = {s.session_id for s in live.engine.list_sessions(limit=1000)}
    assert after - before == {stored.id}


def test_retrieve_and_delete(live):
    client = live.client()
    r = _create(client, input=QUESTION)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage.total_tokens == r.usage.total_tokens
    with httpx.Client(base_url=live.url, timeout=60) as http:
        deleted = http.delete(f"/v1/responses/{r.id}")
        assert deleted.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
        again = http.delete(f"/v1/responses/{r.id}")
    assert again.status_code == 404
    assert_error_shape(again.content, code="response_not_found")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert live.engine.get_session(r.id).turn == 1  # the session and its turn stay


def test_stream_events_match_the_non_streamed_text(live):
    client = live.client()
    plain = _create(client, input=QUESTION, max_output_tokens=10)
    with client.responses.stream(model="m", input=QUESTION, max_output_tokens=10) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas and set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == final.output_text == plain.output_text  # greedy, fresh sessions: the same answer
    assert final.usage.output_tokens == plain.usage.output_tokens
    # recorded before response.completed: it can be fetched and continued at once
    assert client.responses.retrieve(final.id).output_text == final.output_text
    nxt = _create(client, input="And the code?", previous_response_id=final.id)
    assert nxt.deltamem["session_id"] == final.id and nxt.usage.input_tokens_details.cached_tokens > 0


def test_create_stream_true(live):
    events = list(live.client().responses.create(model="m", input=QUESTION, max_output_tokens=6, stream=True))
    done = events[-1]
    assert done.type == "response.completed" and done.response.status == "completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == done.response.output[0].content[0].text


def test_the_id_map_is_in_the_store_database(live):
    """Another connection to the database (another worker, or the server after a restart) finds the response."""
    from deltamem_agents.server.response_ids import ResponseStore
    from deltamem_agents.store.connect import make_engine

    r = _create(live.client(), input=QUESTION)
    other = make_engine(live.engine.store.url)
    try:
        record = ResponseStore(other).get("default", r.id)
        assert record is not None and (record.session_id, record.turn) == (r.id, 1)
        assert record.body["output"][0]["content"][0]["text"] == r.output_text
        assert ResponseStore(other).get("elsewhere", r.id) is None
    finally:
        other.dispose()


def test_errors_have_the_openai_shape(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError):  # refused before the stream starts: a real status
        client.responses.create(model="m", input="hi", conversation="conv_nobody", stream=True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nobody")
    with pytest.raises(openai.NotFoundError):
        _create(client, input="hi", previous_response_id="resp_nobody")
    with httpx.Client(base_url=live.url, timeout=60) as http:
        missing = http.get("/v1/responses/resp_nobody")
        bad = {
            "image": {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "tool": {"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
            "empty": {"input": []},
            "no input": {},
            "both": {"input": "hi", "previous_response_id": "resp_x", "conversation": "conv_x"},
            "tokens": {"input": "hi", "max_output_tokens": 0},
        }
        answers = {what: http.post("/v1/responses", json=body) for what, body in bad.items()}
    assert missing.status_code == 404
    assert_error_shape(missing.content, code="response_not_found")
    for what, response in answers.items():
        assert response.status_code == 422, what
        assert_error_shape(response.content, code="invalid_value")


def test_response_ids_are_per_tenant(tenants):
    live, keys = tenants
    acme, globex = live.client(keys["acme"]), live.client(keys["globex"])
    r = _create(acme, input=QUESTION)
    assert live.engine.get_session(r.id, namespace="acme").turn == 1
    with pytest.raises(openai.NotFoundError):
        globex.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        _create(globex, input="What is the code?", previous_response_id=r.id)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {keys['globex']}"}) as http:
        assert http.delete(f"/v1/responses/{r.id}").status_code == 404
    assert acme.responses.retrieve(r.id).id == r.id  # still there for its owner
    assert live.engine.get_session(r.id, namespace="acme").turn == 1


def test_previous_response_after_a_rollback(live):
    """A response whose turn was rolled away cannot be continued: a 404, never another turn's state."""
    client = live.client()
    first = _create(client, input=QUESTION)
    second = _create(client, input="Second.", previous_response_id=first.id)
    live.engine.rollback(first.id, 1)
    with pytest.raises(openai.NotFoundError):
        _create(client, input="Third.", previous_response_id=second.id)
    assert live.engine.get_session(first.id).turn == 1


def test_an_error_mid_stream_is_one_error_event():
    """After the first token an error cannot be a status any more: one ``error`` event, then the end."""
    import asyncio
    import json
    from types import SimpleNamespace

    from deltamem_agents.server.responses import ResponseRequest, _events, _Shape
    from deltamem_agents.server.streaming import OpenStream

    async def chunks():
        raise ValueError("boom")
        yield  # an async generator

    closed = []

    async def on_close():
        closed.append(True)

    async def collect():
        handle = OpenStream(chunks(), SimpleNamespace(text="Hi", result=None), on_close)
        shape = _Shape(SimpleNamespace(engine=SimpleNamespace(model_name="tiny")), ResponseRequest(input="x"),
                       "resp_t", None)
        return [e async for e in _events(handle, None, shape, None)]

    events = [e.decode().split("\n") for e in asyncio.run(collect())]
    assert [e[0] for e in events][-2:] == ["event: response.output_text.delta", "event: error"]
    error = json.loads(events[-1][1].removeprefix("data: "))
    assert error["type"] == "error" and error["code"] == "invalid_value" and error["message"] == "boom"
    assert error["error"]["code"] == "invalid_value" and error["sequence_number"] == len(events) - 1
    assert closed == [True]
