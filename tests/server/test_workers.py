"""``deltamem serve --workers 2`` over one PostgreSQL database: no update is lost across worker processes.

The server runs as a real subprocess (``python -m deltamem_agents.cli serve --workers 2``) on a tiny random
Llama saved to a temporary directory, with the embedded tokenizer, against a PostgreSQL database created for
this module and dropped afterwards (so its key table and sessions never meet another run's). Skipped without a
PostgreSQL server (``$DELTAMEM_TEST_POSTGRES_URL`` or the default local one, as the store tests).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
psycopg = pytest.importorskip("psycopg")

PG_ENV = "DELTAMEM_TEST_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
MAX_RETRIES = 5  # a 409 is retried this often before it counts as refused


def _pg_admin_url() -> str:
    url = os.environ.get(PG_ENV, "").strip() or DEFAULT_PG_URL
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error:
        if os.environ.get("CI"):
            pytest.fail(f"the workers test needs PostgreSQL at {url}")
        pytest.skip(f"the workers test needs PostgreSQL at {url} or ${PG_ENV}")
    return url


def save_tiny_model(path: Path) -> Path:
    """A random 2-layer Llama (vocab 49,152) and the embedded tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from deltamem_agents.models import embedded_model_dir

    tok_dir = embedded_model_dir()
    if not (tok_dir / "tokenizer_config.json").is_file():
        pytest.skip("embedded model not fetched (run `deltamem model fetch`)")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerServer:
    """``deltamem serve --workers N`` in a subprocess; ``url`` once ``/health`` answers."""

    def __init__(self, model_dir: Path, store: str, workers: int = 2, log: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deltamem_agents.cli", "serve", "--workers", str(workers),
               "--store", store, "--model", str(model_dir), "--port", str(self.port), "--threads", "1",
               "--max-new-tokens", "8", "--log-level", "warning"]
        self.log = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180, workers: int = 2) -> None:
        """Until ``workers`` different processes have answered ``/health`` (each loads its own engine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    # a fresh connection per probe lands on either worker; give the other one time to load too
                    time.sleep(3)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not answer /health in time")

    def worker_cpu(self) -> dict[int, float]:
        """CPU seconds so far of each process below the supervisor (the workers; psutil needed)."""
        psutil = pytest.importorskip("psutil")
        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                t = child.cpu_times()
                out[child.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def test_settings_travel_to_workers_by_environment(monkeypatch):
    """What ``--workers`` hands each worker process (``DELTAMEM_*``) reads back as the same settings."""
    from deltamem_agents.server import ServerSettings
    from deltamem_agents.server.serve import settings_to_env

    for name in list(os.environ):
        if name.startswith("DELTAMEM_"):
            monkeypatch.delenv(name)
    settings = ServerSettings(port=9123, store="postgresql://u@h/db", mode="windowed", max_queue=7,
                              max_concurrency=3, require_keys=True, threads=1, namespace="team-a")
    for name, value in settings_to_env(settings).items():
        monkeypatch.setenv(name, value)
    assert ServerSettings() == settings


def test_workers_must_be_positive(capsys):
    from deltamem_agents.cli import main

    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pg_database():
    """A fresh database on the PostgreSQL server (dropped afterwards): ``(url, name)``."""
    from sqlalchemy.engine import make_url

    admin = _pg_admin_url()
    name = f"dm_workers_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def workers(pg_database, tmp_path_factory):
    """Two worker processes serving the tiny model over the module's PostgreSQL database."""
    tmp = tmp_path_factory.mktemp("workers")
    model_dir = save_tiny_model(tmp / "tiny-llama")
    server = WorkerServer(model_dir, pg_database, workers=2, log=tmp / "server.log")
    try:
        server.wait()
    except RuntimeError:
        server.stop()
        pytest.fail(f"{(tmp / 'server.log').read_text(errors='replace')[-4000:]}")
    yield server, pg_database
    server.stop()


def chat_turn(client: Any, session: str, text: str) -> tuple[int, dict[str, Any] | None, int]:
    """One appended turn, retrying 409s: ``(status, body, retries)`` (``body`` only for a 200)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "history": "append",
            "max_tokens": 4, "temperature": 0}
    for attempt in range(MAX_RETRIES + 1):
        r = client.post("/v1/chat/completions", json=body, headers={"X-Session-ID": session})
        if r.status_code != 409 or attempt == MAX_RETRIES:
            return r.status_code, (r.json() if r.status_code == 200 else None), attempt
        time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _hammer(url: str, session: str, messages: list[str]) -> list[tuple[str, int, dict[str, Any] | None, int]]:
    # one connection per thread: uvicorn's workers share the socket, so connections spread over the processes
    with httpx.Client(base_url=url, timeout=120) as client:
        return [(m, *chat_turn(client, session, m)) for m in messages]


def check_record(store_url: str, session: str, acked: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The stored session agrees with the acknowledged turns; returns the GET /v1/sessions/{id} body."""
    from deltamem_agents.store import SQLSessionStore

    n = len(acked)
    turns = sorted(body["deltamem"]["turn"] for _, body in acked)
    assert turns == list(range(1, n + 1)), turns  # every acknowledged turn got its own number; none overwritten
    store = SQLSessionStore(store_url)
    try:
        data = store.load(session, namespace="default", full_record=True)
    finally:
        store.close()
    assert data.info.turn == n and data.info.version == 1 + n, (data.info, n)
    assert [w.role for w in data.written].count("user") == n  # each acknowledged user message was written once
    assert [w.index for w in data.written] == list(range(len(data.written)))
    window_text = [w.content for w in data.window if w.role == "user"]
    assert all(text in window_text for text, _ in acked), "an acknowledged message is missing from the window"
    return data


def test_same_session_from_many_threads_loses_no_update(workers):
    server, store_url = workers
    session = f"shared-{uuid.uuid4().hex[:8]}"
    threads, per_thread = 6, 3
    batches = [[f"thread {t} message {i}" for i in range(per_thread)] for t in range(threads)]
    cpu_before = server.worker_cpu()
    with ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(lambda b: _hammer(server.url, session, b), batches) for r in rs]
    busy = {pid for pid, t in server.worker_cpu().items() if t - cpu_before.get(pid, t) > 0.05}
    assert len(busy) >= 2, f"one worker served everything: {cpu_before} -> {server.worker_cpu()}"
    statuses = Counter(status for _, status, _, _ in results)
    assert set(statuses) <= {200, 409}, statuses  # a refusal is an honest 409, never a 5xx
    acked = [(text, body) for text, status, body, _ in results if status == 200]
    assert acked, statuses
    check_record(store_url, session, acked)
    info = httpx.get(f"{server.url}/v1/sessions/{session}", timeout=30).json()
    assert info["turn"] == len(acked) and info["version"] == 1 + len(acked), info
    assert info["stats"]["snapshots"] == len(acked) + 1  # turn 0 plus one snapshot per acknowledged turn
    print(f"acknowledged {len(acked)}, refused after retries {statuses.get(409, 0)}, "
          f"retries {sum(r for *_, r in results)}, busy workers {len(busy)}")


def test_different_sessions_run_concurrently(workers):
    server, store_url = workers
    sessions = [f"own-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    with ThreadPoolExecutor(len(sessions)) as pool:
        results = list(pool.map(lambda s: _hammer(server.url, s, [f"{s} turn {i}" for i in range(3)]), sessions))
    for session, rs in zip(sessions, results, strict=True):
        assert [status for _, status, _, _ in rs] == [200, 200, 200], rs  # no contention: no 409 at all
        check_record(store_url, session, [(text, body) for text, _, body, _ in rs])
        info = httpx.get(f"{server.url}/v1/sessions/{session}", timeout=30).json()
        assert info["turn"] == 3 and info["version"] == 4, info


def test_load_script_on_two_workers(workers):
    """The load test (``deltamem_agents.benchmarks.server_load``), small: every session consistent, no error."""
    import asyncio

    from deltamem_agents.benchmarks.server_load import format_report, run_load

    server, _ = workers
    result = asyncio.run(run_load(server.url, sessions=3, turns=3, concurrency=3, max_tokens=4, wait_s=5))
    print(format_report(result))
    assert result.requests == result.ok == 9 and not result.errors, result
    assert result.consistent_sessions == 3 and not result.inconsistent, result.inconsistent
    assert result.p50_ms <= result.p99_ms and result.completion_tokens > 0
