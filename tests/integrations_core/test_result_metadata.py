"""The mapping from a turn's result to the metadata both integrations report, the served model's name, the
generation defaults taken from the engine, and the shared message rules."""

from __future__ import annotations

import json

import pytest

from deltamem_agents.engine import ChatResult, InvalidMessageError, SamplingParams, Usage
from deltamem_agents.engine.engine import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING
from deltamem_agents.engine.messages import normalize_messages
from deltamem_agents.integrations import (
    EMBEDDED_MODEL_NAME,
    GenerationDefaults,
    SessionTarget,
    engine_message,
    engine_role,
    generation_options,
    openai_tool_call,
    result_metadata,
    served_model_name,
    text_from_parts,
    usage_metadata,
)

HELLO = [{"role": "user", "content": "Hello there."}]


def test_every_field_of_a_result_is_mapped():
    usage = Usage(prompt_tokens=40, completion_tokens=7, written_tokens=55, full_context_tokens=90, cached_tokens=30)
    result = ChatResult("hi", "length", usage, "s1", "acme", 4, replayed=True, rolled_back_to=2,
                        written_messages=3, mode="online", kv_cache="hot")
    meta = result_metadata(result, model_name="m", version=9)
    assert meta == {
        "model_name": "m", "finish_reason": "length", "session_id": "s1", "namespace": "acme", "version": 9,
        "turn": 4, "replayed": True, "rolled_back_to": 2, "mode": "online", "kv_cache": "hot",
        "written_messages": 3,
        "usage": {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47, "cached_tokens": 30,
                  "written_tokens": 55, "full_context_tokens": 90},
    }
    assert json.loads(json.dumps(meta)) == meta  # plain data
    hidden = result_metadata(result, model_name="m", ephemeral=True, version=9)
    assert (hidden["session_id"], hidden["version"], hidden["turn"]) == (None, None, None)
    assert hidden["usage"] == meta["usage"]


def test_metadata_of_real_turns(make_engine):
    engine = make_engine(mode="online")
    first = SessionTarget.resolve(engine, "meta")
    result = engine.chat("meta", HELLO, **first.call_options("auto"))
    meta = result_metadata(result, model_name=served_model_name(None, engine), version=first.version(result))
    assert meta["version"] == engine.get_session("meta").version
    assert meta["turn"] == 1 and meta["kv_cache"] == "new" and meta["usage"]["cached_tokens"] == 0
    assert meta["usage"] == usage_metadata(result.usage) and meta["usage"]["completion_tokens"] > 0
    again = engine.chat("meta", [*HELLO, {"role": "assistant", "content": result.text},
                                 {"role": "user", "content": "And now?"}])
    meta2 = result_metadata(again, model_name="m", version=first.version(again))
    assert meta2["turn"] == 2 and meta2["version"] > meta["version"]
    assert meta2["kv_cache"] == "hot" and meta2["usage"]["cached_tokens"] > 0  # the previous turn's cache


def test_served_model_name(tmp_path, make_engine):
    assert served_model_name() == EMBEDDED_MODEL_NAME == "SmolLM2-135M-Instruct"
    (tmp_path / "my-model").mkdir()
    (tmp_path / "q.Q8_0.gguf").write_bytes(b"")
    assert served_model_name(tmp_path / "my-model") == "my-model"  # a directory's name, never its path
    assert served_model_name(str(tmp_path / "q.Q8_0.gguf")) == "q.Q8_0"
    assert served_model_name("org/some-model") == "org/some-model"  # a hub id as given
    engine = make_engine()
    assert served_model_name("ignored", engine) == engine.model_name


def test_generation_defaults_come_from_the_engine(make_engine):
    plain = GenerationDefaults.of()
    assert (plain.max_new_tokens, plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (
        DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING.temperature, DEFAULT_SAMPLING.top_p, DEFAULT_SAMPLING.top_k,
        DEFAULT_SAMPLING.repetition_penalty)
    engine = make_engine(max_new_tokens=2, sampling=SamplingParams(temperature=0.0, top_k=5))
    own = GenerationDefaults.of(engine)
    assert (own.max_new_tokens, own.temperature, own.top_k) == (2, 0.0, 5)
    assert own.effective(temperature=0.7, max_new_tokens=None)["temperature"] == 0.7
    assert own.effective(max_new_tokens=None)["max_new_tokens"] == 2
    with pytest.raises(TypeError):
        own.effective(temprature=1.0)
    # Only explicitly set options are passed on, so the engine's defaults apply to the rest.
    assert generation_options() == {}
    assert generation_options(temperature=0.0, top_k=None, stop=[]) == {"temperature": 0.0, "stop": []}
    result = engine.chat("defaults", HELLO, **generation_options())
    assert result.usage.completion_tokens <= 2  # the engine's max_new_tokens, not a framework's
    result = engine.chat("explicit", HELLO, **generation_options(max_new_tokens=1))
    assert result.usage.completion_tokens <= 1
    with pytest.raises(ValueError, match="temperature"):  # the engine validates, before writing anything
        engine.chat("bad", HELLO, **generation_options(temperature=float("nan")))


def test_message_rules():
    assert [engine_role(r) for r in ("human", "ai", "developer", "model", "chatbot", "function", "user")] == [
        "user", "assistant", "system", "assistant", "assistant", "tool", "user"]
    assert text_from_parts([("text", "a"), ("text", "b")], role="user", owner="X") == "ab"
    assert text_from_parts([("text", "a"), ("reasoning", None)], role="assistant", owner="X") == "a"
    with pytest.raises(InvalidMessageError, match="X accepts text only.*'image'"):
        text_from_parts([("text", "look"), ("image", None)], role="user", owner="X")
    call = openai_tool_call("c1", "add", {"a": 1})
    assert call == {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    msgs = [
        engine_message("human", "Add 1."),
        engine_message("ai", "", tool_calls=[call]),
        engine_message("tool", "1", tool_call_id="c1", name="add"),
    ]
    assert msgs[0] == {"role": "user", "content": "Add 1."}  # no empty optional fields
    assert msgs[2] == {"role": "tool", "content": "1", "name": "add", "tool_call_id": "c1"}
    normalized = normalize_messages(msgs)  # what the engine accepts
    assert [m.role for m in normalized] == ["user", "assistant", "tool"]
