"""The real ``openai`` client (sync and async) against a live uvicorn server: models, chat completions streamed
and not, usage with cached tokens, session continuity, throwaway sessions, legacy completions."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

QUESTION = [{"role": "user", "content": "Remember: the launch code is 4471."}]


def _sample(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text exposition."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def _stream_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_models_lists_the_engine_model(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [live.engine.model_name]
    assert models.data[0].owned_by == "deltamem"
    assert live.client().models.retrieve(live.engine.model_name).id == live.engine.model_name


def test_chat_completion_non_streaming(live):
    raw = live.client().chat.completions.with_raw_response.create(
        model="anything", messages=QUESTION, max_tokens=6, extra_headers={"X-Session-ID": "nonstream"})
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == live.engine.model_name  # one model is served, whatever the client names
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.prompt_tokens_details.cached_tokens == 0  # a new session: nothing cached
    info = live.engine.get_session("nonstream")
    assert raw.headers["X-Session-ID"] == "nonstream"
    assert int(raw.headers["X-Session-Version"]) == info.version
    assert completion.deltamem["session_version"] == info.version and completion.deltamem["turn"] == info.turn == 1


def test_stream_matches_non_stream_and_has_the_openai_shape(live):
    client = live.client()
    plain = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=10)
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert _stream_text(chunks) == plain.choices[0].message.content  # greedy: the same answer
    # finish_reason only on the last content chunk; no usage chunk without include_usage
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices and c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stream_with_include_usage_ends_with_a_usage_chunk(live):
    chunks = list(live.client().chat.completions.create(
        model="m", messages=QUESTION, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens >= 1 and last.usage.prompt_tokens > 0
    assert last.usage.prompt_tokens_details.cached_tokens == 0
    assert all(c.usage is None for c in content)
    assert content[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_sse_events_end_with_done(live):
    body = {"model": "m", "messages": QUESTION, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in events[0]  # only announced with include_usage
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_session_continuity_reuses_the_kv_cache(live):
    client = live.client()
    headers = {"X-Session-ID": "continuity"}
    history = [{"role": "user", "content": "My name is Ada."}]
    first = client.chat.completions.with_raw_response.create(model="m", messages=history, max_tokens=6,
                                                             extra_headers=headers)
    reply = first.parse().choices[0].message.content
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "What is my name?"}]
    second = client.chat.completions.with_raw_response.create(model="m", messages=history, max_tokens=6,
                                                              extra_headers=headers)
    usage = second.parse().usage
    assert usage.prompt_tokens_details.cached_tokens > 0  # the first turn's KV cache was hot
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert second.parse().deltamem["kv_cache"] == "hot" and not second.parse().deltamem["replayed"]
    assert int(second.headers["X-Session-Version"]) > int(first.headers["X-Session-Version"])
    assert live.engine.get_session("continuity").turn == 2


def test_session_id_body_field_and_conversation_pick_the_session(live):
    client = live.client()
    client.chat.completions.create(model="m", messages=QUESTION, max_tokens=3, extra_body={"session_id": "by-body"})
    client.chat.completions.create(model="m", messages=QUESTION, max_tokens=3,
                                   extra_body={"conversation": {"id": "conv-1"}})
    assert live.engine.get_session("by-body").turn == 1
    assert live.engine.get_session("conv-1").turn == 1


def test_throwaway_sessions_leave_nothing_behind(live):
    store = live.engine.store
    before = {(s.namespace, s.session_id) for s in store.list_sessions(namespace=None, limit=1000)}
    client = live.client()
    client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4)
    list(client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, stream=True))
    client.completions.create(model="m", prompt="Once upon a time", max_tokens=4)
    after = {(s.namespace, s.session_id) for s in store.list_sessions(namespace=None, limit=1000)}
    assert after == before
    deadline = time.monotonic() + 10  # the private store is emptied in a worker thread as each response ends
    while live.state.throwaway.store.list_sessions(namespace=None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.state.throwaway.store.list_sessions(namespace=None) == []
    assert live.state.throwaway.kv_cache_stats().sessions == 0


def test_stream_closed_early_commits_nothing(live):
    client = live.client()
    stream = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=400, stream=True,
                                            extra_headers={"X-Session-ID": "closed-early"})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while live.state.limiter.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.state.limiter.admitted == 0
    assert not live.engine.store.exists("closed-early")  # a session is created by its first commit only


def test_options_reach_the_engine(live, monkeypatch):
    seen = {}
    original = live.engine.achat

    async def spy(session_id, messages, **kwargs):
        seen.update(kwargs, messages=messages)
        return await original(session_id, messages, **kwargs)

    monkeypatch.setattr(live.engine, "achat", spy)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    live.client().chat.completions.create(
        model="m", messages=[{"role": "developer", "content": "Be brief."}, *QUESTION], max_tokens=50,
        max_completion_tokens=3, temperature=0.7, top_p=0.5, stop=["\n\n"], seed=7, tools=tools,
        extra_headers={"X-Session-ID": "options"})
    assert seen["max_new_tokens"] == 3  # max_completion_tokens wins over max_tokens
    assert (seen["temperature"], seen["top_p"], seen["stop"], seen["seed"]) == (0.7, 0.5, ["\n\n"], 7)
    assert seen["tools"] == tools and seen["history"] == "full" and seen["namespace"] == "default"
    assert seen["messages"][0]["role"] == "system"  # developer is the newer name of system


def test_async_client_chat_and_stream(live):
    async def main():
        client = live.async_client()
        try:
            plain = await client.chat.completions.create(model="m", messages=QUESTION, max_tokens=8)
            stream = await client.chat.completions.create(model="m", messages=QUESTION, max_tokens=8, stream=True,
                                                          stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            # two sessions at once: the engine interleaves them, each as if alone
            both = await asyncio.gather(*(
                client.chat.completions.create(model="m", messages=QUESTION, max_tokens=8,
                                               extra_headers={"X-Session-ID": f"async-{i}"}) for i in range(2)
            ))
        finally:
            await client.close()
        return plain, chunks, both

    plain, chunks, both = asyncio.run(main())
    assert _stream_text(chunks) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [b.choices[0].message.content for b in both] == [plain.choices[0].message.content] * 2


def test_legacy_completions(live):
    client = live.client()
    completion = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion" and completion.model == live.engine.model_name
    text = completion.choices[0].text
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    echoed = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + text
    # with a session, each prompt is appended as a new user turn
    for _ in range(2):
        client.completions.create(model="m", prompt="Tell me more.", max_tokens=3,
                                  extra_headers={"X-Session-ID": "legacy"})
    assert live.engine.get_session("legacy").turn == 2
    assert live.engine.stats("legacy").written_messages == 4


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_health_and_metrics_need_no_key(live, path):
    assert httpx.get(live.url + path, timeout=30).status_code == 200


def test_metrics_count_requests_tokens_and_the_kv_cache(live):
    client = live.client()
    history = [{"role": "user", "content": "Count this."}]
    reply = client.chat.completions.create(model="m", messages=history, max_tokens=3,
                                           extra_headers={"X-Session-ID": "metrics-secret-id"})
    history += [{"role": "assistant", "content": reply.choices[0].message.content}, {"role": "user", "content": "Again."}]
    client.chat.completions.create(model="m", messages=history, max_tokens=3,
                                   extra_headers={"X-Session-ID": "metrics-secret-id"})
    text = httpx.get(live.url + "/metrics", timeout=30).text
    assert 'deltamem_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    for kind in ("prompt", "completion", "cached"):
        assert f'deltamem_tokens_total{{kind="{kind}"}}' in text
    assert _sample(text, 'deltamem_tokens_total{kind="cached"}') > 0
    for name in ("deltamem_kv_cache_hits_total", "deltamem_kv_cache_misses_total", "deltamem_sessions ",
                 "deltamem_request_duration_seconds_bucket", "deltamem_requests_admitted"):
        assert name in text
    assert _sample(text, "deltamem_kv_cache_hits_total") >= 1
    assert _sample(text, "deltamem_sessions") >= 1
    assert "metrics-secret-id" not in text  # routes are labelled by template, never by id
