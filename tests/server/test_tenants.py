"""Tenants: each API key works in its own namespace only. One tenant cannot read, list, fork, roll back,
export or delete another's sessions — not even by guessing ids (404, exactly as for an id nobody uses)."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import assert_error_shape

MESSAGES = [{"role": "user", "content": "The acme launch code is 4471."}]


@pytest.fixture(scope="module")
def acme_session(tenants):
    live, keys = tenants
    live.client(keys["acme"]).chat.completions.create(model="m", messages=MESSAGES, max_tokens=3,
                                                      extra_headers={"X-Session-ID": "acme-secret"})
    return "acme-secret"


def _http(live, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=live.url, headers=headers, timeout=60)


def test_sessions_land_in_the_keys_namespace(tenants, acme_session):
    live, _ = tenants
    assert live.engine.get_session(acme_session, namespace="acme").turn == 1
    assert not live.engine.store.exists(acme_session, namespace="globex")
    assert not live.engine.store.exists(acme_session, namespace="default")


def test_other_tenant_cannot_touch_the_session(tenants, acme_session):
    live, keys = tenants
    version = live.engine.get_session(acme_session, namespace="acme").version
    with _http(live, keys["globex"]) as globex:
        assert acme_session not in {s["id"] for s in globex.get("/v1/sessions").json()["data"]}
        attempts = {
            "show": globex.get(f"/v1/sessions/{acme_session}"),
            "fork": globex.post(f"/v1/sessions/{acme_session}/fork", json={"new_id": "stolen"}),
            "rollback": globex.post(f"/v1/sessions/{acme_session}/rollback", json={"turn": 0}),
            "reset": globex.post(f"/v1/sessions/{acme_session}/reset"),
            "export": globex.get(f"/v1/sessions/{acme_session}/export"),
            "delete": globex.delete(f"/v1/sessions/{acme_session}"),
        }
        guessed = globex.get("/v1/sessions/no-such-session-anywhere")
    for what, response in attempts.items():
        assert response.status_code == 404, what
        assert_error_shape(response.content, code="session_not_found")
    # an existing id of another tenant reads exactly like an id nobody uses (nothing leaks)
    assert guessed.status_code == 404
    leak = attempts["show"].json()["error"]["message"].replace(acme_session, "no-such-session-anywhere")
    assert leak == guessed.json()["error"]["message"]
    assert "namespace 'acme'" not in attempts["show"].text
    assert not live.engine.store.exists("stolen", namespace="acme")
    assert not live.engine.store.exists("stolen", namespace="globex")
    assert live.engine.get_session(acme_session, namespace="acme").version == version  # untouched


def test_same_id_in_another_tenant_is_another_session(tenants, acme_session):
    live, keys = tenants
    version = live.engine.get_session(acme_session, namespace="acme").version
    reply = live.client(keys["globex"]).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the launch code?"}], max_tokens=3,
        extra_headers={"X-Session-ID": acme_session})
    assert reply.deltamem["turn"] == 1 and reply.usage.prompt_tokens_details.cached_tokens == 0
    assert live.engine.get_session(acme_session, namespace="globex").turn == 1
    assert live.engine.get_session(acme_session, namespace="acme").version == version


def test_import_goes_to_the_importers_namespace(tenants, acme_session):
    live, keys = tenants
    with _http(live, keys["acme"]) as acme, _http(live, keys["globex"]) as globex:
        exported = acme.get(f"/v1/sessions/{acme_session}/export").content
        imported = globex.post("/v1/sessions/import", params={"session_id": "from-acme"}, content=exported)
        assert imported.status_code == 201
        assert imported.json()["namespace"] == "globex"
        assert not live.engine.store.exists("from-acme", namespace="acme")
        assert acme.get("/v1/sessions/from-acme").status_code == 404


@pytest.mark.parametrize("key", [None, "", "dm-not-a-real-key", "sk-openai-style", "revoked"])
def test_bad_or_missing_keys_get_401(tenants, key):
    live, keys = tenants
    key = keys.get(key, key)
    with _http(live, key) as client:
        for response in (client.get("/v1/models"), client.get("/v1/sessions"),
                         client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert assert_error_shape(response.content, code="invalid_api_key")["type"] == "authentication_error"


def test_openai_client_maps_401(tenants):
    live, _ = tenants
    with pytest.raises(openai.AuthenticationError) as info:
        live.client("dm-wrong").models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"


def test_keys_are_stored_hashed(tenants):
    live, keys = tenants
    from sqlalchemy import text

    with live.engine.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT namespace, key_hash FROM deltamem_api_keys")).all()
    stored = " ".join(str(v) for row in rows for v in row)
    assert all(secret not in stored for secret in keys.values())
    assert {ns for ns, _ in rows} == {"acme", "globex"}
