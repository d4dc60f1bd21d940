"""Tool calls through ChatDeltaMem: the engine parses them in the template's format and writes the reply with the
same ids, so the AIMessage LangChain sends back (with the tool's result) continues the session without a replay.

A tiny random model cannot be made to write a call: ``script_replies`` replaces only the text the decode loop
produces; parsing, writing, the AIMessage and the next turn's history matching are the real code.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_deltamem import ChatDeltaMem

from deltamem_agents.integrations.testing import script_replies, tool_calling_engine


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


@pytest.fixture
def engine(embedded, tmp_path):
    _, tokenizer = embedded
    eng = tool_calling_engine(tokenizer, f"sqlite:///{tmp_path / 's.db'}")  # a template with Hermes tool calls
    assert eng.tool_call_format is not None and eng.tool_call_format.name == "hermes"
    yield eng
    eng.close()


@pytest.mark.parametrize("streaming", [False, True])
def test_tool_call_round_trip_continues_the_session(engine, monkeypatch, streaming):
    script_replies(monkeypatch, [
        'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        "It is sunny in Paris.",
    ])
    llm = ChatDeltaMem(engine=engine, session_id="trip", streaming=streaming).bind_tools([get_weather])
    history = [HumanMessage("What is the weather in Paris?")]
    ai = llm.invoke(history)
    assert ai.content == "Let me check."
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    history += [ai, ToolMessage(get_weather.invoke({"city": "Paris"}), tool_call_id=ai.tool_calls[0]["id"])]
    final = llm.invoke(history)
    assert final.content == "It is sunny in Paris." and not final.tool_calls
    assert final.response_metadata["replayed"] is False  # the resent AIMessage matched what was written
    assert final.response_metadata["turn"] == 2
