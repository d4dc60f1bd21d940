"""``deltamem serve --batch-decode``: the option reaches the engine, and concurrent streamed sessions on a live
server (the real ``openai`` client, one thread each) share batched decode steps and all complete with the
answers they get one at a time."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from batch_helpers import LogitRecorder, StepGate, assert_no_near_ties

from deltamem_agents import cli

SESSIONS = {f"b{i}": [{"role": "system", "content": "You are terse."}] * (i % 2)
            + [{"role": "user", "content": "Say something. " * (i + 1)}] for i in range(4)}
MAX_TOKENS = {"b0": 5, "b1": 14, "b2": 9, "b3": 11}


def test_batch_decode_settings_from_flags_and_environment(monkeypatch):
    from deltamem_agents.server import ServerSettings
    from deltamem_agents.server.cli_commands import settings_from_args

    off = ServerSettings()
    assert off.batch_decode is False and off.max_concurrency == 4
    monkeypatch.setenv("DELTAMEM_BATCH_DECODE", "true")
    monkeypatch.setenv("DELTAMEM_BATCH_MAX_ROWS", "6")
    on = ServerSettings()
    assert on.batch_decode is True and on.batch_max_rows == 6
    assert on.max_concurrency == 6  # the batch can fill: min(batch_max_rows, max_queue)
    monkeypatch.delenv("DELTAMEM_BATCH_DECODE")
    argv = ["serve", "--batch-decode", "--batch-max-rows", "32", "--max-queue", "20"]
    settings = settings_from_args(cli.build_parser(argv).parse_args(argv))
    assert (settings.batch_decode, settings.batch_max_rows, settings.max_concurrency) == (True, 32, 20)


def test_build_engine_passes_the_option(monkeypatch):
    from deltamem_agents.server import ServerSettings, app

    seen = {}

    class Recording:
        def __init__(self, model, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr("deltamem_agents.engine.MemoryEngine", Recording)
    app.build_engine(ServerSettings(batch_decode=True, batch_max_rows=3))
    assert seen["batch_decode"] is True and seen["batch_max_rows"] == 3


def _serve(app, engine):
    """uvicorn on a free loopback port in a daemon thread (as the ``live`` fixture does)."""
    import openai
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"

    def stop():
        server.should_exit = True
        thread.join(timeout=30)

    return SimpleNamespace(engine=engine, stop=stop, url=url.removesuffix("/v1"),
                           client=lambda: openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=60))


@pytest.fixture(scope="module")
def batched_live(tiny_dm, tokenizer, tmp_path_factory):
    from deltamem_agents.engine import MemoryEngine, SamplingParams
    from deltamem_agents.server import ServerSettings, create_app

    db = tmp_path_factory.mktemp("server-batched") / "s.db"
    engine = MemoryEngine((tiny_dm, tokenizer), store=f"sqlite:///{db}", sampling=SamplingParams(temperature=0.0),
                          max_new_tokens=12, batch_decode=True)
    settings = ServerSettings(max_queue=8, batch_decode=True)
    assert settings.max_concurrency == 8
    server = _serve(create_app(engine, settings), engine)
    yield server
    server.stop()
    engine.close()


def _stream(client, sid, messages, max_tokens):
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Session-ID": sid}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    return text, finishes, chunks[-1].usage


def test_concurrent_streamed_sessions_complete_with_their_one_at_a_time_answers(batched_live):
    engine = batched_live.engine
    client = batched_live.client()
    # One at a time first: each request is alone in the batcher (a lone row is the plain path, bitwise).
    recorder = LogitRecorder(engine.runner)
    reference = {sid: _stream(client, "ref-" + sid, msgs, MAX_TOKENS[sid]) for sid, msgs in SESSIONS.items()}
    assert_no_near_ties(recorder.logits, "one at a time")
    steps_before = engine.batch_stats().steps

    gate = StepGate(engine.runner, engine._batcher, n=len(SESSIONS))
    results, errors = {}, []

    def run(sid):
        try:
            results[sid] = _stream(batched_live.client(), sid, SESSIONS[sid], MAX_TOKENS[sid])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(sid,)) for sid in SESSIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(gate.sizes) == len(SESSIONS)  # the four streams shared decode steps
    for sid in SESSIONS:
        text, finishes, usage = results[sid]
        ref_text, ref_finishes, ref_usage = reference[sid]
        assert (text, finishes) == (ref_text, ref_finishes) and len(finishes) == 1, sid
        assert usage.completion_tokens == ref_usage.completion_tokens <= MAX_TOKENS[sid]
        assert engine.get_session(sid).turn == 1
        assert engine.session_state(sid).equal(engine.session_state("ref-" + sid)), sid
    assert engine.batch_stats().steps > steps_before and engine._batcher.sessions == 0
    metrics = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in httpx.get(f"{batched_live.url}/metrics").text.splitlines()
               if line.startswith("deltamem_batch_")}
    stats = engine.batch_stats()
    assert metrics["deltamem_batch_steps_total"] == stats.steps and metrics["deltamem_batch_max_rows"] == len(SESSIONS)
    assert metrics["deltamem_batch_row_steps_total"] == stats.row_steps > stats.steps
