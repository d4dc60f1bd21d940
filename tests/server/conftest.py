"""Server fixtures: a tiny random model with the embedded tokenizer, engines on SQLite files, and live uvicorn
servers on 127.0.0.1 (a background thread each) that the real ``openai`` client talks to."""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install -e '.[server]')")
pytest.importorskip("openai", reason="the server tests need the openai client (pip install -e '.[dev,server]')")

# make_tiny_dm lives with the engine tests (a module of its own there: two conftests cannot import each other)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import make_tiny_dm  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (ChatML template) — no model weights needed."""
    from transformers import AutoTokenizer

    from deltamem_agents.models import embedded_model_dir

    path = embedded_model_dir()
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip("embedded model not fetched (run `deltamem model fetch`)")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_dm():
    return make_tiny_dm()


def make_engine(dm: Any, tokenizer: Any, db: Path, **kwargs: Any) -> Any:
    """A greedy MemoryEngine on the tiny model and an SQLite file (online mode, as the server's default)."""
    from deltamem_agents.engine import MemoryEngine, SamplingParams

    kwargs.setdefault("max_new_tokens", 12)
    return MemoryEngine((dm, tokenizer), store=f"sqlite:///{db}", sampling=SamplingParams(temperature=0.0),
                        **kwargs)


@dataclass
class Live:
    """A running server: its base URL, app and engine."""

    url: str
    app: Any
    engine: Any
    server: Any
    thread: threading.Thread

    @property
    def state(self) -> Any:
        return self.app.state.deltamem

    def client(self, api_key: str = "local", **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def async_client(self, api_key: str = "local", **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(app: Any, engine: Any) -> Live:
    """uvicorn on a free loopback port, in a daemon thread; returns once it accepts connections."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{port}", app, engine, server, thread)


@pytest.fixture(scope="module")
def live(tiny_dm, tokenizer, tmp_path_factory):
    """Local single-user mode (no keys), on its own database."""
    from deltamem_agents.server import ServerSettings, create_app

    db = tmp_path_factory.mktemp("server-local") / "s.db"
    engine = make_engine(tiny_dm, tokenizer, db, max_message_tokens=256)
    app = create_app(engine, ServerSettings(max_queue=4))
    server = start_server(app, engine)
    yield server
    server.stop()
    engine.close()


@pytest.fixture(scope="module")
def tenants(tiny_dm, tokenizer, tmp_path_factory):
    """Keys mode: two tenants, ``acme`` and ``globex``, each with a key; yields ``(live, keys)`` where ``keys``
    maps namespace → secret (plus ``"revoked"``: a revoked acme key)."""
    from deltamem_agents.server import KeyStore, ServerSettings, create_app

    db = tmp_path_factory.mktemp("server-tenants") / "s.db"
    with KeyStore(f"sqlite:///{db}") as keys:  # as `deltamem keys create` would, before the server starts
        secrets = {ns: keys.create(ns, f"{ns} test key")[1] for ns in ("acme", "globex")}
        revoked, secrets["revoked"] = keys.create("acme", "old")
        keys.revoke(revoked.id)
    engine = make_engine(tiny_dm, tokenizer, db)
    app = create_app(engine, ServerSettings())
    server = start_server(app, engine)
    yield server, secrets
    server.stop()
    engine.close()
