"""Issue 13 through the server: a chat history that diverges from what the session holds is a 409
``history_conflict`` (nothing written), unless the request (body field or header) or the server's setting says
``rollback``; through the real openai client and raw HTTP on a live server."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import assert_error_shape

DIVERGENCE_HEADER = "X-DeltaMem-On-Divergence"


def _chat(client, session, messages, headers=None, **kwargs):
    return client.chat.completions.with_raw_response.create(
        model="m", messages=messages, max_tokens=3, extra_headers={"X-Session-ID": session, **(headers or {})},
        **kwargs)


def _version(live, session) -> int:
    return live.engine.get_session(session).version


def test_another_clients_history_is_409_and_writes_nothing(live):
    client = live.client()
    a = [{"role": "user", "content": "I am client A."}]
    first = _chat(client, "shared-409", a).parse()
    a += [{"role": "assistant", "content": first.choices[0].message.content}]
    version = _version(live, "shared-409")
    with pytest.raises(openai.ConflictError) as info:  # client B: its own conversation, same session
        _chat(client, "shared-409", [{"role": "user", "content": "I am client B."}])
    assert info.value.status_code == 409 and info.value.body["code"] == "history_conflict"
    assert info.value.body["param"] == "messages" and "nothing was written" in info.value.body["message"]
    assert info.value.response.headers["X-Session-Version"] == str(version)
    assert_error_shape({"error": info.value.body})
    assert _version(live, "shared-409") == version
    # streamed: the same 409 before any event
    raw = httpx.post(live.url + "/v1/chat/completions", timeout=60, headers={"X-Session-ID": "shared-409"},
                     json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "B again"}]})
    assert raw.status_code == 409
    assert_error_shape(raw.content, code="history_conflict")
    # client A goes on: its history still extends the session
    nxt = _chat(client, "shared-409", [*a, {"role": "user", "content": "Still me."}]).parse()
    assert nxt.deltamem["replayed"] is False and nxt.deltamem["turn"] == 2


def test_regenerate_needs_rollback_by_body_header_or_setting(live):
    client = live.client()
    history = [{"role": "user", "content": "Tell me a fact."}]
    _chat(client, "regen", history)
    version = _version(live, "regen")
    with pytest.raises(openai.ConflictError):  # a regenerate resends the history without the last reply
        _chat(client, "regen", history)
    assert _version(live, "regen") == version
    by_body = _chat(client, "regen", history, extra_body={"on_divergence": "rollback"}).parse()
    assert by_body.deltamem["replayed"] is True
    by_header = _chat(client, "regen", history, headers={DIVERGENCE_HEADER: "rollback"}).parse()
    assert by_header.deltamem["replayed"] is True
    live.state.settings.on_divergence = "rollback"  # `deltamem serve --on-divergence rollback`
    try:
        by_setting = _chat(client, "regen", history).parse()
        assert by_setting.deltamem["replayed"] is True
        with pytest.raises(openai.ConflictError):  # a request can still ask for reject
            _chat(client, "regen", history, extra_body={"on_divergence": "reject"})
    finally:
        live.state.settings.on_divergence = "reject"
    assert live.engine.stats("regen").written_messages == 2


def test_bad_divergence_values_are_422(live):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad_header = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60,
                            headers={DIVERGENCE_HEADER: "ignore"})
    assert bad_header.status_code == 422
    assert assert_error_shape(bad_header.content, code="invalid_value")["param"] == DIVERGENCE_HEADER
    bad_field = httpx.post(live.url + "/v1/chat/completions", json={**body, "on_divergence": "ignore"}, timeout=60)
    assert bad_field.status_code == 422
    assert assert_error_shape(bad_field.content, code="invalid_value")["param"] == "on_divergence"
    disagree = httpx.post(live.url + "/v1/chat/completions", json={**body, "on_divergence": "reject"}, timeout=60,
                          headers={DIVERGENCE_HEADER: "rollback"})
    assert disagree.status_code == 422


def test_engine_option_errors_are_422_naming_the_option(live):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}
    response = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422
    assert assert_error_shape(response.content, code="invalid_value")["param"] == "max_new_tokens"


def test_too_many_messages_is_413(live):
    many = [{"role": "user", "content": f"m{i}"} for i in range(1001)]
    response = httpx.post(live.url + "/v1/chat/completions", json={"model": "m", "messages": many}, timeout=60)
    assert response.status_code == 413
    assert_error_shape(response.content, code="too_many_messages")


def test_settings_and_flag():
    from pydantic import ValidationError

    from deltamem_agents.cli import build_parser
    from deltamem_agents.server import ServerSettings
    from deltamem_agents.server.cli_commands import settings_from_args

    assert ServerSettings().on_divergence == "reject" and ServerSettings().max_messages_per_call == 1000
    args = build_parser(["serve"]).parse_args(["serve", "--on-divergence", "rollback",
                                               "--max-messages-per-call", "50"])
    settings = settings_from_args(args)
    assert settings.on_divergence == "rollback" and settings.max_messages_per_call == 50
    with pytest.raises(ValidationError):
        ServerSettings(on_divergence="sometimes")


def test_a_client_that_trims_its_history_says_auto(live):
    """A client that keeps only the start and the end of a long conversation (trim_messages and the like) sends a
    view, not the whole conversation: under the default ``history: "full"`` that diverges; ``"auto"`` writes only
    its new message."""
    client = live.client()
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        history.append({"role": "user", "content": f"Fact number {i}."})
        reply = _chat(client, "trimmed", history).parse()
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    trimmed = [history[0], *history[-2:], {"role": "user", "content": "And the last one?"}]
    version = _version(live, "trimmed")
    with pytest.raises(openai.ConflictError):
        _chat(client, "trimmed", trimmed)
    assert _version(live, "trimmed") == version
    ok = _chat(client, "trimmed", trimmed, extra_body={"history": "auto"}).parse()
    assert ok.deltamem["replayed"] is False and ok.deltamem["turn"] == 4
    assert ok.deltamem["written_tokens"] > 0 and _version(live, "trimmed") == version + 1
