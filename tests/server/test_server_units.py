"""Settings, the key table, authentication modes, the bind check and the ``serve`` / ``keys`` commands —
no model, no server."""

from __future__ import annotations

import hashlib
import json

import pytest

from deltamem_agents import cli


def _settings(**kwargs):
    from deltamem_agents.server import ServerSettings

    return ServerSettings(**kwargs)


def test_settings_from_the_environment_and_flags(monkeypatch):
    from deltamem_agents.server.cli_commands import settings_from_args

    monkeypatch.setenv("DELTAMEM_PORT", "9000")
    monkeypatch.setenv("DELTAMEM_MAX_QUEUE", "3")
    monkeypatch.setenv("DELTAMEM_STORE", "sqlite:////tmp/x.db")
    monkeypatch.setenv("DELTAMEM_MODE", "state_only")
    settings = _settings()
    assert (settings.port, settings.max_queue, settings.store, settings.mode) == (9000, 3, "sqlite:////tmp/x.db",
                                                                                  "state-only")
    assert settings.max_concurrency == 3  # min(4, max_queue)
    argv = ["serve", "--port", "9100", "--host", "::1", "--threads", "2", "--max-queue", "8", "--require-keys",
            "--kv-cache-dir", "none"]
    args = cli.build_parser(argv).parse_args(argv)
    settings = settings_from_args(args)
    assert (settings.port, settings.host, settings.threads, settings.max_queue) == (9100, "::1", 2, 8)
    assert settings.require_keys and settings.kv_cache_dir is None
    assert settings.store == "sqlite:////tmp/x.db"  # not given as a flag: the environment's
    assert (settings.device, settings.dtype) == (None, None)  # the loader's defaults: CUDA + bf16 when present
    monkeypatch.setenv("DELTAMEM_DTYPE", "bf16")
    argv = ["serve", "--device", "cuda:1"]
    settings = settings_from_args(cli.build_parser(argv).parse_args(argv))
    assert (settings.device, settings.dtype) == ("cuda:1", "bfloat16")


@pytest.mark.parametrize("bad", [{"port": 70000}, {"max_queue": 0}, {"mode": "everything"},
                                 {"max_queue": 2, "max_concurrency": 3}, {"namespace": "a/b"},
                                 {"max_message_tokens": 0}, {"device": "gpu0"}, {"dtype": "int8"}])
def test_invalid_settings_are_refused(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _settings(**bad)


def test_serve_and_keys_are_plugin_commands():
    assert cli._plugins_for(["serve", "--port", "1"]) == ["deltamem_agents.server.cli_commands"]
    assert cli._plugins_for(["keys", "list"]) == ["deltamem_agents.server.cli_commands"]


def test_key_store_creates_hashes_lists_and_revokes(tmp_path):
    from deltamem_agents.server.keys import KeyNotFoundError, KeyStore, hash_key

    url = f"sqlite:///{tmp_path}/k.db"
    with KeyStore(url) as keys:
        assert keys.count() == 0
        key, secret = keys.create("acme", "ci")
        assert secret.startswith("dm-") and len(secret) >= 40
        assert hash_key(secret) == hashlib.sha256(secret.encode()).hexdigest()
        assert keys.lookup(secret) == key
        assert keys.lookup(secret + "x") is None and keys.lookup("") is None and keys.lookup("dm-") is None
        other, _ = keys.create("globex")
        assert [k.id for k in keys.list_keys()] == [key.id, other.id]
        assert [k.id for k in keys.list_keys("globex")] == [other.id]
        revoked = keys.revoke(key.id)
        assert revoked.revoked_at is not None and not revoked.active
        assert keys.lookup(secret) is None
        assert [k.id for k in keys.list_keys(include_revoked=False)] == [other.id]
        assert keys.count() == 2
        with pytest.raises(KeyNotFoundError):
            keys.revoke("key_nope")
        with pytest.raises(ValueError):
            keys.create("not a namespace!")
    assert secret.encode() not in (tmp_path / "k.db").read_bytes()
    with KeyStore(url) as again:  # the table exists now: opened, not recreated
        assert again.count() == 2


def test_key_table_lives_beside_the_session_tables(tmp_path):
    from sqlalchemy import inspect

    from deltamem_agents.server.keys import KeyStore
    from deltamem_agents.store import open_store

    store = open_store(f"sqlite:///{tmp_path}/s.db")
    try:
        with KeyStore(store.engine) as keys:
            keys.create("acme")
        tables = set(inspect(store.engine).get_table_names())
        assert {"deltamem_api_keys", "sessions", "snapshots"} <= tables
        assert store.list_sessions(namespace=None) == []  # the store is untouched and still works
    finally:
        store.close()


def test_authenticator_modes(tmp_path):
    from deltamem_agents.server.auth import Authenticator, Tenant, is_loopback
    from deltamem_agents.server.errors import APIError
    from deltamem_agents.server.keys import KeyStore

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("") and not is_loopback(None)
    with KeyStore(f"sqlite:///{tmp_path}/k.db") as keys:
        auth = Authenticator(keys, namespace="solo")
        assert auth.authenticate(None, "127.0.0.1") == Tenant("solo")
        assert auth.authenticate("Bearer whatever", "127.0.0.1") == Tenant("solo")  # local mode ignores keys
        with pytest.raises(APIError) as info:  # local mode never answers on a public socket
            auth.authenticate(None, "10.0.0.5")
        assert info.value.status == 401
        key, secret = keys.create("acme")
        auth = Authenticator(keys, namespace="solo")
        assert auth.authenticate(f"Bearer {secret}", "10.0.0.5") == Tenant("acme", key.id)
        for header in (None, "Bearer nope", f"Basic {secret}", secret):
            with pytest.raises(APIError) as info:
                auth.authenticate(header, "127.0.0.1")
            assert info.value.status == 401
        keys.revoke(key.id)  # revoking the last key locks the server, it does not reopen local mode
        with pytest.raises(APIError):
            Authenticator(keys, namespace="solo").authenticate(None, "127.0.0.1")
    with KeyStore("sqlite://") as empty, pytest.raises(APIError):
        Authenticator(empty, namespace="solo", require_keys=True).authenticate(None, "127.0.0.1")


def test_bind_check_refuses_public_hosts_without_keys(tmp_path):
    from deltamem_agents.server.keys import KeyStore
    from deltamem_agents.server.serve import ServerConfigError, check_bind

    with KeyStore(f"sqlite:///{tmp_path}/k.db") as keys:
        assert check_bind(_settings(host="127.0.0.1"), keys) is False
        with pytest.raises(ServerConfigError, match="refusing to listen on '0.0.0.0' without API keys"):
            check_bind(_settings(host="0.0.0.0"), keys)
        assert check_bind(_settings(host="0.0.0.0", require_keys=True), keys) is True
        keys.create("acme")
        assert check_bind(_settings(host="0.0.0.0"), keys) is True


def test_serve_command_refuses_before_loading_the_model(tmp_path, capsys):
    code = cli.main(["serve", "--host", "0.0.0.0", "--store", f"sqlite:///{tmp_path}/s.db"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0'" in err and "deltamem keys create" in err
    assert cli.main(["serve", "--port", "99999"]) == 2
    assert "invalid server settings" in capsys.readouterr().err


def test_keys_commands(tmp_path, capsys):
    store = ["--store", f"sqlite:///{tmp_path}/s.db"]
    assert cli.main(["keys", "create", "--namespace", "acme", "--name", "laptop", *store]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert secret.startswith("dm-") and "shown only now" in out.err
    assert cli.main(["keys", "list", "--json", *store]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["namespace"], r["name"], r["revoked_at"]) for r in rows] == [("acme", "laptop", None)]
    assert secret not in json.dumps(rows)
    assert cli.main(["keys", "revoke", rows[0]["id"], *store]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli.main(["keys", "list", "--active", *store]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["keys", "revoke", "key_missing", *store]) == 1
    assert "no API key" in capsys.readouterr().err


def test_app_on_an_in_memory_store_runs_in_local_mode(tiny_dm, tokenizer):
    """An engine whose store has no database gets an in-memory key table (local mode); the metrics count its
    sessions by listing them."""
    from fastapi.testclient import TestClient

    from deltamem_agents.engine import MemoryEngine, SamplingParams
    from deltamem_agents.server import create_app
    from deltamem_agents.store.memory import InMemorySessionStore

    engine = MemoryEngine((tiny_dm, tokenizer), store=InMemorySessionStore(), max_new_tokens=2,
                          sampling=SamplingParams(temperature=0.0))
    with TestClient(create_app(engine), base_url="http://127.0.0.1") as client:
        reply = client.post("/v1/chat/completions", headers={"X-Session-ID": "mem"},
                            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200 and reply.headers["x-session-version"] == "2"
        assert "deltamem_sessions 1.0" in client.get("/metrics").text
    assert engine.get_session("mem").turn == 1
