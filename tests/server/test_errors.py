"""Errors: OpenAI's shape with real status codes (404, 409, 413, 422, 503, 500), through the openai client
and raw HTTP, and never a traceback in a response. (401: ``test_tenants.py``.)"""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import assert_error_shape

OK = [{"role": "user", "content": "Hello"}]


def _post(live, body, path="/v1/chat/completions", **kwargs):
    return httpx.post(live.url + path, json=body, timeout=60, **kwargs)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "messages": OK, "n": 2}, "n"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "m", "messages": OK, "temperature": 5}, "temperature"),
    ({"model": "m", "messages": OK, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": OK, "logprobs": True}, "logprobs"),
    ({"model": "m", "messages": OK, "stream_options": {"include_usage": True}}, None),
    ({"model": "m"}, "messages"),
])
def test_invalid_params_are_422(live, body, param):
    response = _post(live, body)
    assert response.status_code == 422
    error = assert_error_shape(response.content, code="invalid_value")
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if body.get("n") == 2:
        assert "n=1" in error["message"]


@pytest.mark.parametrize(("body", "code"), [
    ({"model": "m", "messages": [{"role": "user", "content": "   "}]}, "invalid_messages"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "invalid_messages"),
])
def test_messages_the_engine_refuses_are_422(live, body, code):
    response = _post(live, body)
    assert response.status_code == 422
    assert_error_shape(response.content, code=code)


def test_malformed_json_is_422(live):
    response = httpx.post(live.url + "/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 422
    assert_error_shape(response.content)


def test_invalid_session_ids_are_422(live):
    response = _post(live, {"model": "m", "messages": OK}, headers={"X-Session-ID": "bad id/with slash"})
    assert response.status_code == 422
    assert assert_error_shape(response.content, code="invalid_identifier")["param"] == "X-Session-ID"
    disagree = _post(live, {"model": "m", "messages": OK, "session_id": "b"}, headers={"X-Session-ID": "a"})
    assert disagree.status_code == 422
    assert_error_shape(disagree.content)


def test_openai_client_maps_422(live):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        live.client().chat.completions.create(model="m", messages=OK, n=3)
    assert info.value.status_code == 422 and info.value.body["param"] == "n"


def test_oversized_message_is_413(live):
    huge = " ".join(["memory"] * 600)  # over the engine's max_message_tokens=256
    with pytest.raises(openai.APIStatusError) as info:
        live.client().chat.completions.create(model="m", messages=[{"role": "user", "content": huge}])
    assert info.value.status_code == 413
    assert info.value.body["code"] == "message_too_long"
    assert_error_shape({"error": info.value.body})
    stream = _post(live, {"model": "m", "stream": True, "messages": [{"role": "user", "content": huge}]})
    assert stream.status_code == 413  # a stream fails before it starts, with the real status
    assert_error_shape(stream.content, code="message_too_long")


def test_turn_over_the_context_window_is_413(live):
    text = " ".join(["memory"] * 200)  # fits max_message_tokens, but not with 400 new tokens in 512 positions
    response = _post(live, {"model": "m", "max_tokens": 400, "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 413
    assert_error_shape(response.content, code="context_length_exceeded")


def test_unknown_session_model_and_route_are_404(live):
    with pytest.raises(openai.NotFoundError) as info:
        live.client().models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"
    for response, code in ((httpx.get(live.url + "/v1/sessions/nobody", timeout=30), "session_not_found"),
                           (httpx.post(live.url + "/v1/sessions/nobody/fork", json={}, timeout=30),
                            "session_not_found"),
                           (httpx.get(live.url + "/v1/nothing-here", timeout=30), "unknown_route")):
        assert response.status_code == 404
        assert_error_shape(response.content, code=code)
    wrong_method = httpx.put(live.url + "/v1/models", timeout=30)
    assert wrong_method.status_code == 405
    assert_error_shape(wrong_method.content)


def test_fork_onto_an_existing_id_is_409(live):
    client = live.client()
    for sid in ("conflict-a", "conflict-b"):
        client.chat.completions.create(model="m", messages=OK, max_tokens=2, extra_headers={"X-Session-ID": sid})
    response = httpx.post(live.url + "/v1/sessions/conflict-a/fork", json={"new_id": "conflict-b"}, timeout=30)
    assert response.status_code == 409
    assert_error_shape(response.content, code="session_exists")


def test_version_conflict_is_409(live, monkeypatch):
    from deltamem_agents.store.base import ConcurrentUpdateError

    async def conflicting(*_args, **_kwargs):
        raise ConcurrentUpdateError("session 'x' in namespace 'default' changed (version 3, expected 2)")

    monkeypatch.setattr(live.engine, "achat", conflicting)
    with pytest.raises(openai.ConflictError) as info:
        live.client().chat.completions.create(model="m", messages=OK, extra_headers={"X-Session-ID": "x"})
    assert info.value.status_code == 409 and info.value.body["code"] == "session_conflict"


def test_full_queue_is_503_with_retry_after(live):
    limiter = live.state.limiter
    held = [limiter.admit() for _ in range(limiter.max_queue)]  # as if max_queue requests were in progress
    try:
        response = _post(live, {"model": "m", "messages": OK})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert assert_error_shape(response.content, code="overloaded")["type"] == "server_error"
        stream = _post(live, {"model": "m", "messages": OK, "stream": True})
        assert stream.status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            live.client().chat.completions.create(model="m", messages=OK)
        assert info.value.status_code == 503
        # the sessions API and health are not model work: they still answer
        assert httpx.get(live.url + "/v1/sessions", timeout=30).status_code == 200
        assert httpx.get(live.url + "/health", timeout=30).json()["requests_admitted"] == limiter.max_queue
    finally:
        for ticket in held:
            ticket.release()
    assert _post(live, {"model": "m", "messages": OK, "max_tokens": 2}).status_code == 200


def test_unexpected_errors_are_500_without_details(live, monkeypatch, caplog):
    def boom(*_args, **_kwargs):
        raise RuntimeError("secret internal detail at /srv/deltamem/internal.py")

    monkeypatch.setattr(live.engine, "list_sessions", boom)
    response = httpx.get(live.url + "/v1/sessions", timeout=30)
    assert response.status_code == 500
    error = assert_error_shape(response.content, code="internal_error")
    assert "secret" not in response.text and "/srv" not in response.text and error["type"] == "server_error"
    assert any("secret internal detail" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_unexpected_errors_outside_the_engine_mapping_are_500(live, monkeypatch):
    def boom(*_args, **_kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(live.state.metrics, "render", boom)
    response = httpx.get(live.url + "/metrics", timeout=30)
    assert response.status_code == 500
    assert_error_shape(response.content, code="internal_error")
