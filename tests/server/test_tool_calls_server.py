"""Tool calls through the live server with the real clients: ``openai`` (sync and streaming) and LangChain's
``ChatOpenAI(...).bind_tools(...)``, on a tiny random Llama whose tokenizer carries Qwen2.5's chat template.

The tiny random model cannot be steered into writing a call (the API has no ``logit_bias``), so each test
scripts the **text the decode loop produces** (``tool_helpers.script_replies``, which patches the engine's
``generate``) — these tests are about our parsing and serialisation. Everything after that text is real: the
engine's parser, the reply written into the session as the assistant message a client sends back, the commit,
the server's bodies and SSE chunks, the client libraries' parsing, and the next turn's history matching.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from tool_helpers import ADD_TOOL, QWEN25, WEATHER_TOOL, script_replies, with_template

TOOLS = [WEATHER_TOOL, ADD_TOOL]
CALL = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO_CALLS = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "when": {"day": '
             '"today"}}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')


def server_conftest(config: Any) -> Any:
    """This directory's conftest module as pytest loaded it (its helpers ``make_engine``, ``start_server``)."""
    return config.pluginmanager.get_plugin(str(Path(__file__).resolve().parent / "conftest.py"))


@pytest.fixture(scope="module")
def tool_live(tiny_dm, tokenizer, tmp_path_factory, request):
    """A live server whose model's chat template has a tool-call format (Qwen2.5's)."""
    from deltamem_agents.server import ServerSettings, create_app

    helpers = server_conftest(request.config)
    db = tmp_path_factory.mktemp("server-tools") / "s.db"
    engine = helpers.make_engine(tiny_dm, with_template(tokenizer, QWEN25), db, max_message_tokens=256)
    assert engine.tool_call_format is not None and engine.tool_call_format.name == "hermes"
    app = create_app(engine, ServerSettings(max_queue=4))
    server = helpers.start_server(app, engine)
    yield server
    server.stop()
    engine.close()


@pytest.fixture
def turns(tool_live, monkeypatch):
    """Records every engine result (``replayed``, ``kv_cache``…) the server got, for the history checks."""
    seen: list[Any] = []
    for name in ("achat", "astream"):
        original = getattr(tool_live.engine, name)
        if name == "achat":
            async def spy(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                result = await _original(*args, **kwargs)
                seen.append(result)
                return result
        else:
            async def spy(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                async for chunk in _original(*args, **kwargs):
                    if chunk.result is not None:
                        seen.append(chunk.result)
                    yield chunk
        monkeypatch.setattr(tool_live.engine, name, spy)
    return seen


def _sid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_chat_completion_returns_tool_calls_and_the_conversation_continues(tool_live, monkeypatch, turns):
    script_replies(monkeypatch, [CALL, "It is sunny."])
    client, session = tool_live.client(), _sid("tools")
    history: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=12,
                                       extra_headers={"X-Session-ID": session})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    # The client sends back the assistant message as it received it, and the tool's result.
    history += [choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    r2 = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=12,
                                        extra_headers={"X-Session-ID": session})
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "It is sunny."
    assert r2.choices[0].message.tool_calls is None
    assert r2.deltamem["replayed"] is False and r2.deltamem["kv_cache"] == "hot" and r2.deltamem["turn"] == 2
    assert [t.replayed for t in turns] == [False, False] and turns[1].written_messages == 2


def test_streamed_tool_calls_have_openais_shape(tool_live, monkeypatch, turns):
    script_replies(monkeypatch, [TWO_CALLS, "Sunny, and 5."], piece=2)
    client, session = tool_live.client(), _sid("tools-stream")
    history: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris, and 2+3?"}]
    chunks = list(client.chat.completions.create(
        model="m", messages=history, tools=TOOLS, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Session-ID": session}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    content = "".join(d.content or "" for d in deltas)
    assert content == "Let me look."  # no part of a call, nor of its tags, was sent as text
    assert all("<" not in (d.content or "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert entry["id"] is None  # the id comes once, with the name, before the arguments
                entry["id"], entry["name"] = tc.id, tc.function.name
                assert tc.type == "function"
            else:
                assert entry["id"] is not None
            entry["arguments"] += tc.function.arguments or ""
    assert sorted(calls) == [0, 1]
    assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == ("get_weather", {"city": "Paris", "when": {"day": "today"}})
    assert (calls[1]["name"], json.loads(calls[1]["arguments"])) == ("add", {"a": 2, "b": 3})
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    # Continue with what the stream delivered: recognised, no replay.
    assistant = {"role": "assistant", "content": content, "tool_calls": [
        {"id": calls[i]["id"], "type": "function", "function": {"name": calls[i]["name"],
                                                               "arguments": calls[i]["arguments"]}} for i in (0, 1)]}
    history += [assistant, {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
                {"role": "tool", "tool_call_id": calls[1]["id"], "content": "5"}]
    r2 = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=12,
                                        extra_headers={"X-Session-ID": session})
    assert r2.choices[0].message.content == "Sunny, and 5."
    assert r2.deltamem["replayed"] is False and r2.deltamem["kv_cache"] == "hot"
    assert [t.replayed for t in turns] == [False, False] and turns[1].written_messages == 3


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": "rm_rf", "arguments": {"path": "/"}}\n</tool_call>',  # not an offered tool
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>',  # broken JSON
])  # fmt: skip
def test_unknown_tools_and_broken_calls_stay_text(tool_live, monkeypatch, stream, reply):
    script_replies(monkeypatch, [reply])
    client = tool_live.client()
    kwargs = {"model": "m", "messages": [{"role": "user", "content": "go"}], "tools": TOOLS, "max_tokens": 12}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == reply
        assert not any(d.tool_calls for d in deltas)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    else:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].message.content == reply and r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "stop"


def test_tool_choice_none_leaves_the_reply_as_text(tool_live, monkeypatch, turns):
    script_replies(monkeypatch, [CALL])
    r = tool_live.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}],
                                                   tools=TOOLS, tool_choice="none", max_tokens=12,
                                                   extra_headers={"X-Session-ID": _sid("no-tools")})
    assert r.choices[0].message.content == CALL and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop" and turns[0].tool_calls == ()


def test_langchain_bind_tools_round_trip(tool_live, monkeypatch, turns):
    pytest.importorskip("langchain_openai", reason="pip install langchain-openai")
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    script_replies(monkeypatch, [CALL, "It is sunny.", TWO_CALLS.replace('"add"', '"get_weather"')])
    session = _sid("lc-tools")
    llm = ChatOpenAI(base_url=f"{tool_live.url}/v1", api_key="local", model="tiny", max_tokens=12, temperature=0,
                     max_retries=0, timeout=60, default_headers={"X-Session-ID": session}).bind_tools([get_weather])
    history: list[Any] = [HumanMessage("Weather in Paris?")]
    first = llm.invoke(history)
    assert isinstance(first, AIMessage) and first.content == "Checking."
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert first.response_metadata["finish_reason"] == "tool_calls"

    call = first.tool_calls[0]
    history += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    second = llm.invoke(history)
    assert second.content == "It is sunny." and second.tool_calls == []
    assert turns[1].replayed is False and turns[1].kv_cache == "hot"  # LangChain's resent call was recognised

    history += [second, HumanMessage("And tomorrow?")]
    chunks = list(llm.stream(history))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.content == "Let me look."
    assert [c["name"] for c in merged.tool_calls] == ["get_weather", "get_weather"]
    assert turns[2].replayed is False


def test_llama_index_openai_like_tool_round_trip(tool_live, monkeypatch, turns):
    pytest.importorskip("llama_index.llms.openai_like", reason="pip install llama-index-llms-openai-like")
    from llama_index.core.llms import ChatMessage, MessageRole
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    script_replies(monkeypatch, [CALL, "It is sunny."])
    tool = FunctionTool.from_defaults(fn=get_weather)
    llm = OpenAILike(model="tiny", api_base=f"{tool_live.url}/v1", api_key="local", is_chat_model=True,
                     is_function_calling_model=True, context_window=512, max_tokens=12, temperature=0,
                     max_retries=0, timeout=60, default_headers={"X-Session-ID": _sid("li-tools")})
    history = [ChatMessage(role=MessageRole.USER, content="Weather in Paris?")]
    first = llm.chat_with_tools([tool], chat_history=history)
    (selection,) = llm.get_tool_calls_from_response(first)
    assert (selection.tool_name, selection.tool_kwargs) == ("get_weather", {"city": "Paris"})
    assert first.message.content == "Checking."

    history += [first.message, ChatMessage(role=MessageRole.TOOL, content=get_weather(**selection.tool_kwargs),
                                           additional_kwargs={"tool_call_id": selection.tool_id})]
    second = llm.chat_with_tools([tool], chat_history=history)
    assert second.message.content == "It is sunny."
    assert llm.get_tool_calls_from_response(second, error_on_no_tool_call=False) == []
    assert turns[1].replayed is False and turns[1].kv_cache == "hot"  # LlamaIndex's resent call was recognised


# ---------------------------------------------------------------------------------------------- Responses API
RESPONSE_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                   "parameters": t["function"]["parameters"]} for t in TOOLS]


def test_responses_function_calls_and_outputs(tool_live, monkeypatch, turns):
    script_replies(monkeypatch, [CALL, "It is sunny."])
    client = tool_live.client()
    r = client.responses.create(model="m", input="Weather in Paris?", tools=RESPONSE_TOOLS, max_output_tokens=12)
    message, call = r.output
    assert message.type == "message" and r.output_text == "Checking."
    assert call.type == "function_call" and call.status == "completed" and call.id.startswith("fc_")
    assert call.call_id.startswith("call_") and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert [t.name for t in r.tools] == ["get_weather", "add"]
    assert client.responses.retrieve(r.id).output[1].call_id == call.call_id  # stored as returned

    r2 = client.responses.create(model="m", previous_response_id=r.id, tools=RESPONSE_TOOLS, max_output_tokens=12,
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r2.output_text == "It is sunny." and [o.type for o in r2.output] == ["message"]
    assert r2.deltamem["turn"] == 2 and r2.deltamem["kv_cache"] == "hot" and not r2.deltamem["replayed"]
    assert turns[1].written_messages == 2  # the tool output and the answer


def test_responses_streamed_function_calls(tool_live, monkeypatch):
    script_replies(monkeypatch, ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>\n'
                                 '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'])
    events = list(tool_live.client().responses.create(model="m", input="2+3, and Oslo?", tools=RESPONSE_TOOLS,
                                                      max_output_tokens=12, stream=True))
    types = [e.type for e in events]
    assert "response.output_text.delta" not in types and "response.content_part.added" not in types  # only calls
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(i.type, i.name, i.arguments, i.status) for i in added] == [
        ("function_call", "add", "", "in_progress"), ("function_call", "get_weather", "", "in_progress")]
    args = {e.output_index: e.arguments for e in events if e.type == "response.function_call_arguments.done"}
    deltas = {e.output_index: e.delta for e in events if e.type == "response.function_call_arguments.delta"}
    assert args == deltas and json.loads(args[0]) == {"a": 2, "b": 3} and json.loads(args[1]) == {"city": "Oslo"}
    final = events[-1]
    assert final.type == "response.completed"
    assert [(o.type, o.name) for o in final.response.output] == [("function_call", "add"), ("function_call", "get_weather")]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [d.id for d in done] == [o.id for o in final.response.output] == [a.id for a in added]


def test_responses_refuse_other_tools_and_orphan_outputs(tool_live):
    import httpx

    with httpx.Client(base_url=tool_live.url, timeout=60) as http:
        web = http.post("/v1/responses", json={"input": "hi", "tools": [{"type": "web_search"}]})
        orphan = http.post("/v1/responses", json={"input": [
            {"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "call_x", "output": "1"}]})
        answered = http.post("/v1/responses", json={"max_output_tokens": 2, "input": [
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "call_x", "name": "add", "arguments": "{\"a\": 1}"},
            {"type": "function_call_output", "call_id": "call_x", "output": "1"}]})
    assert web.status_code == 422 and "function tools" in web.json()["error"]["message"]
    assert orphan.status_code == 422 and orphan.json()["error"]["param"] == "input"
    assert answered.status_code == 200, answered.text
