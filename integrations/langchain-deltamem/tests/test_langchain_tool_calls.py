"""Tool calls through ChatDeltaMem: the engine parses them in the template's format and writes the reply with the
same ids, so the AIMessage LangChain sends back (with the tool's result) continues the session without a replay.

A tiny random model cannot be made to write a call: ``script_replies`` replaces only the text the decode loop
produces; parsing, writing, the AIMessage and the next turn's history matching are the real code.
"""

from __future__ import annotations

import pytest
import torch
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_deltamem import ChatDeltaMem

from deltamem_agents import MemoryEngine
from deltamem_agents.integrations.testing import script_replies

# A minimal ChatML template with the Hermes tool-call convention (written for this test).
HERMES_TEMPLATE = """
{%- if tools %}<|im_start|>system
Tools you may call: {% for t in tools %}{{ t | tojson }} {% endfor %}
To call one, answer <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


@pytest.fixture
def engine(embedded, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tokenizer = embedded
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = HERMES_TEMPLATE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=1024)).eval()
    eng = MemoryEngine((model, tok), adapter="none", store=f"sqlite:///{tmp_path / 's.db'}")
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
