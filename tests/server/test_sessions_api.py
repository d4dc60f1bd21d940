"""``/v1/sessions``: list, show, fork, rollback, reset, export, import, delete — over HTTP, on a live server."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import assert_error_shape


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def _two_turns(live, session_id: str) -> list[dict]:
    client = live.client()
    history = [{"role": "user", "content": "My cat is called Pixel."}]
    for question in ("What is my cat called?", None):
        reply = client.chat.completions.create(model="m", messages=history, max_tokens=4,
                                               extra_headers={"X-Session-ID": session_id})
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
        if question:
            history.append({"role": "user", "content": question})
    return history


def test_list_and_show(live, http):
    _two_turns(live, "api-show")
    listed = http.get("/v1/sessions").json()
    assert listed["object"] == "list" and "api-show" in {s["id"] for s in listed["data"]}
    shown = http.get("/v1/sessions/api-show").json()
    assert shown["id"] == "api-show" and shown["object"] == "session" and shown["turn"] == 2
    assert shown["version"] == live.engine.get_session("api-show").version
    assert shown["stats"]["written_messages"] == 4 and shown["stats"]["snapshots"] == 3
    assert [t["turn"] for t in shown["turns"]] == [0, 1, 2]
    assert http.get("/v1/sessions", params={"limit": 1}).json()["has_more"] is True


def test_fork_rollback_reset_delete(live, http):
    _two_turns(live, "api-src")
    fork = http.post("/v1/sessions/api-src/fork", json={"new_id": "api-fork", "turn": 1})
    assert fork.status_code == 201 and fork.json()["id"] == "api-fork" and fork.json()["turn"] == 1
    assert live.engine.get_session("api-src").turn == 2  # the source is untouched
    random_fork = http.post("/v1/sessions/api-src/fork", json={})
    assert random_fork.status_code == 201 and random_fork.json()["turn"] == 2
    rolled = http.post("/v1/sessions/api-src/rollback", json={"turn": 1}).json()
    assert rolled["turn"] == 1 and live.engine.get_session("api-src").turn == 1
    assert http.post("/v1/sessions/api-src/reset").json()["turn"] == 0
    gone = http.delete("/v1/sessions/api-fork")
    assert gone.json() == {"id": "api-fork", "object": "session.deleted", "deleted": True}
    assert_error_shape(http.get("/v1/sessions/api-fork").content, code="session_not_found")
    # a rollback to a turn the session does not have
    missing_turn = http.post("/v1/sessions/api-src/rollback", json={"turn": 9})
    assert missing_turn.status_code == 404
    assert_error_shape(missing_turn.content)


def test_export_then_import_round_trips(live, http):
    history = _two_turns(live, "api-export")
    exported = http.get("/v1/sessions/api-export/export")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/octet-stream"
    assert exported.content[:8] and "api-export.safetensors" in exported.headers["content-disposition"]
    imported = http.post("/v1/sessions/import", params={"session_id": "api-imported"}, content=exported.content,
                         headers={"Content-Type": "application/octet-stream"})
    assert imported.status_code == 201, imported.text
    assert imported.json()["id"] == "api-imported" and imported.json()["turn"] == 1
    # resending the exported history writes nothing new: the record came with the file
    same = live.client().chat.completions.create(model="m", messages=[*history, {"role": "user", "content": "Hi"}],
                                                 max_tokens=3, extra_headers={"X-Session-ID": "api-imported"})
    assert not same.deltamem["replayed"]
    taken = http.post("/v1/sessions/import", params={"session_id": "api-imported"}, content=exported.content)
    assert taken.status_code == 409
    assert_error_shape(taken.content, code="session_exists")
    at_turn = http.get("/v1/sessions/api-export/export", params={"turn": 1})
    assert at_turn.status_code == 200 and at_turn.content != exported.content


def test_import_refuses_garbage_without_leaking_paths(live, http):
    bad = http.post("/v1/sessions/import", content=b"not a safetensors file at all")
    assert bad.status_code == 422
    error = assert_error_shape(bad.content, code="invalid_session_file")
    assert "/tmp" not in error["message"] and "deltamem-import" not in error["message"]
    empty = http.post("/v1/sessions/import", content=b"")
    assert empty.status_code == 422


def test_import_size_limit(live, http, monkeypatch):
    monkeypatch.setattr(live.state.settings, "max_import_bytes", 16)
    big = http.post("/v1/sessions/import", content=b"x" * 64)
    assert big.status_code == 413
    assert_error_shape(big.content, code="file_too_large")
