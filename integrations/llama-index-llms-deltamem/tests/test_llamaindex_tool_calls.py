"""Tool calls through DeltaMemLLM (LlamaIndex's FunctionCallingLLM protocol): the engine parses them in the
template's format and writes the reply with the same ids, so the message LlamaIndex sends back (with the tool's
result) continues the session without a replay.

A tiny random model cannot be made to write a call: ``script_replies`` replaces only the text the decode loop
produces; parsing, writing, the LlamaIndex messages, the agent's loop and the next turn's history matching are
the real code.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from llama_index.llms.deltamem import DeltaMemLLM, ToolCallingUnsupportedError, session_scope  # noqa: E402

from deltamem_agents.engine import InvalidOptionError, SessionNotFoundError  # noqa: E402
from deltamem_agents.errors import DeltaMemError  # noqa: E402
from deltamem_agents.integrations import NoToolCallError, close_ephemeral_engine  # noqa: E402
from deltamem_agents.integrations.testing import script_replies, tool_calling_engine  # noqa: E402

pytestmark = pytest.mark.embedded

CALL = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
ANSWER = "It is sunny in Paris."
QUESTION = "What is the weather in Paris?"


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


WEATHER = FunctionTool.from_defaults(fn=get_weather)


@pytest.fixture
def engine(embedded, tmp_path):
    eng = tool_calling_engine(embedded[1], f"sqlite:///{tmp_path / 's.db'}")
    assert eng.tool_call_format is not None and eng.tool_call_format.name == "hermes"
    yield eng
    close_ephemeral_engine(eng)
    eng.close()


def _tool_result(selection) -> ChatMessage:
    """The tool message LlamaIndex's agents send after a call (``tool_call_id``; ``name`` as some add it)."""
    return ChatMessage(role=MessageRole.TOOL, content=str(WEATHER.call(**selection.tool_kwargs)),
                       additional_kwargs={"tool_call_id": selection.tool_id, "name": selection.tool_name})


def test_function_calling_metadata(engine, deltamem_engine):
    assert DeltaMemLLM(engine=engine).metadata.is_function_calling_model is True
    # the embedded SmolLM2's template has no call format
    assert DeltaMemLLM(engine=deltamem_engine).metadata.is_function_calling_model is False


def test_chat_with_tools_returns_selections_and_the_resend_writes_only_new_messages(engine, monkeypatch):
    script_replies(monkeypatch, [CALL, ANSWER])
    llm = DeltaMemLLM(engine=engine, session_id="li-tools")
    history = [ChatMessage(role=MessageRole.USER, content=QUESTION)]
    response = llm.chat_with_tools([WEATHER], chat_history=history)
    assert len(history) == 1  # the caller's list is not changed
    assert response.message.content == "Let me check."
    (call,) = response.message.additional_kwargs["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    (block,) = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert (block.tool_call_id, block.tool_name, block.tool_kwargs) == (call["id"], "get_weather", {"city": "Paris"})
    assert response.raw["finish_reason"] == "tool_calls"
    assert response.raw["written_messages"] == 2  # the question and the reply (with its call)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert (selection.tool_id, selection.tool_name, selection.tool_kwargs) == (call["id"], "get_weather",
                                                                                {"city": "Paris"})

    history += [response.message, _tool_result(selection)]
    final = llm.chat_with_tools([WEATHER], chat_history=history)
    assert final.message.content == ANSWER and "tool_calls" not in final.message.additional_kwargs
    assert llm.get_tool_calls_from_response(final, error_on_no_tool_call=False) == []
    with pytest.raises(NoToolCallError):
        llm.get_tool_calls_from_response(final)
    # the resent reply matched what the engine wrote: no replay, only the tool result and the answer written
    assert final.raw["replayed"] is False and final.raw["turn"] == 2
    assert final.raw["written_messages"] == 2
    assert engine.stats("li-tools").written_messages == 4


@pytest.mark.parametrize("form", ["blocks", "openai_objects"])
def test_resent_call_in_other_forms_matches(engine, monkeypatch, form):
    """A history whose assistant message carries the call only as ``ToolCallBlock``s (as LlamaIndex 0.14's
    blocks keep it), or as the OpenAI SDK's objects (as ``llama-index-llms-openai`` stores them), still
    matches the written reply."""
    from openai.types.chat import ChatCompletionMessageToolCall

    script_replies(monkeypatch, [CALL, ANSWER])
    llm = DeltaMemLLM(engine=engine, session_id=f"li-form-{form}")
    history = [ChatMessage(role=MessageRole.USER, content=QUESTION)]
    response = llm.chat_with_tools([WEATHER], chat_history=history)
    (selection,) = llm.get_tool_calls_from_response(response)
    if form == "blocks":
        resent = ChatMessage(role=MessageRole.ASSISTANT, blocks=list(response.message.blocks))
    else:
        calls = [ChatCompletionMessageToolCall.model_validate(c)
                 for c in response.message.additional_kwargs["tool_calls"]]
        resent = ChatMessage(role=MessageRole.ASSISTANT, content=response.message.content,
                             additional_kwargs={"tool_calls": calls})
    final = llm.chat([*history, resent, _tool_result(selection)], tools=[WEATHER])
    assert final.message.content == ANSWER
    assert final.raw["replayed"] is False and final.raw["written_messages"] == 2


async def test_streamed_tool_calls_arrive_on_the_final_chunk(engine, monkeypatch):
    script_replies(monkeypatch, [CALL, ANSWER])  # streamed 3 characters at a time: the tag arrives split
    llm = DeltaMemLLM(engine=engine, session_id="li-stream-tools")
    history = [ChatMessage(role=MessageRole.USER, content=QUESTION)]
    chunks = list(llm.stream_chat_with_tools([WEATHER], chat_history=history))
    deltas = [c.delta or "" for c in chunks]
    assert "".join(deltas) == "Let me check." == chunks[-1].message.content  # no call markup in any delta
    assert all("tool_calls" not in c.message.additional_kwargs for c in chunks[:-1])
    (selection,) = llm.get_tool_calls_from_response(chunks[-1])
    assert (selection.tool_name, selection.tool_kwargs) == ("get_weather", {"city": "Paris"})
    assert chunks[-1].raw["finish_reason"] == "tool_calls"

    history += [chunks[-1].message, _tool_result(selection)]
    stream = await llm.astream_chat_with_tools([WEATHER], chat_history=history)
    achunks = [c async for c in stream]
    assert "".join(c.delta or "" for c in achunks) == ANSWER == achunks[-1].message.content
    assert llm.get_tool_calls_from_response(achunks[-1], error_on_no_tool_call=False) == []
    assert achunks[-1].raw["replayed"] is False and achunks[-1].raw["written_messages"] == 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_function_agent_round_trip(engine, monkeypatch, streaming):
    from llama_index.core.agent.workflow import FunctionAgent

    script_replies(monkeypatch, [CALL, ANSWER])
    session = f"li-agent-{streaming}"
    agent = FunctionAgent(tools=[get_weather], llm=DeltaMemLLM(engine=engine), streaming=streaming)
    with session_scope(session):
        handler = agent.run(QUESTION)
    result = await handler
    assert result.response.content == ANSWER
    assert result.raw["replayed"] is False and result.raw["turn"] == 2
    # call → tool result → answer: the question, the call, the tool's result and the answer, each written once
    stats = engine.stats(session)
    assert stats.info.turn == 2 and stats.written_messages == 4


def test_predict_and_call(engine, monkeypatch):
    script_replies(monkeypatch, [CALL])
    llm = DeltaMemLLM(engine=engine, session_id="li-predict")
    out = llm.predict_and_call([WEATHER], QUESTION)
    assert out.response == "Sunny in Paris."
    (source,) = out.sources
    assert source.tool_name == "get_weather" and source.raw_output == "Sunny in Paris."
    assert engine.get_session("li-predict").turn == 1


def test_a_template_without_a_call_format_refuses_tools(deltamem_engine):
    llm = DeltaMemLLM(engine=deltamem_engine, session_id="li-no-tools", max_new_tokens=2)
    with pytest.raises(ToolCallingUnsupportedError, match="tool-call format") as info:
        llm.chat_with_tools([WEATHER], user_msg="Hi")
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, DeltaMemError)
    with pytest.raises(ToolCallingUnsupportedError):  # refused when the stream is asked for, not when read
        llm.stream_chat_with_tools([WEATHER], user_msg="Hi")
    with pytest.raises(SessionNotFoundError):  # nothing was written
        deltamem_engine.get_session("li-no-tools")
    # tool_choice="none" leaves the tools out: an ordinary turn
    response = llm.chat_with_tools([WEATHER], user_msg="Hi", tool_choice="none")
    assert response.raw["turn"] == 1 and "tool_calls" not in response.message.additional_kwargs


def test_a_tool_that_is_neither_a_llamaindex_tool_nor_a_dict_is_refused(engine):
    llm = DeltaMemLLM(engine=engine, session_id="li-bad-tool")
    with pytest.raises(InvalidOptionError, match="BaseTool"):
        llm.chat([ChatMessage(role=MessageRole.USER, content=QUESTION)], tools=[object()])
    with pytest.raises(SessionNotFoundError):  # refused before anything was written
        engine.get_session("li-bad-tool")
