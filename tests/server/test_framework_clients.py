"""Agent frameworks' OpenAI clients pointed at the live server: LangChain's ``ChatOpenAI``, LlamaIndex's
``OpenAILike`` and LiteLLM.

Each framework resends the whole conversation, as OpenAI's API expects; the server recognises what the session
already holds, so a conversation of k exchanges is a session of k turns (checked with ``GET /v1/sessions/{id}``).
Each test is skipped when its framework is not installed (``llama-index-llms-openai-like`` needs ``openai<3``:
the ``dev`` extra installs it, so the main suite runs on ``openai`` 2.x; CI tests ``openai`` 3.x separately).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

MODEL = "tiny"


def session_record(live: Any, session: str) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{live.url}/v1/sessions/{session}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _sid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_langchain_chat_openai_invoke_and_stream(live):
    pytest.importorskip("langchain_openai", reason="pip install langchain-openai")
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    session = _sid("lc")
    llm = ChatOpenAI(base_url=f"{live.url}/v1", api_key="local", model=MODEL, max_tokens=6, temperature=0,
                     max_retries=0, timeout=60, default_headers={"X-Session-ID": session})
    history: list[Any] = [HumanMessage("My name is Ada.")]
    first = llm.invoke(history)
    assert isinstance(first, AIMessage) and isinstance(first.content, str)
    assert first.usage_metadata["output_tokens"] > 0
    info = session_record(live, session)
    assert info["turn"] == 1 and info["version"] == 2, info

    history += [first, HumanMessage("What is my name?")]
    chunks = list(llm.stream(history))
    streamed = "".join(c.content for c in chunks if isinstance(c.content, str))
    assert chunks and streamed.strip(), chunks
    info = session_record(live, session)
    assert info["turn"] == 2 and info["version"] == 3, info  # the first exchange was recognised, not replayed

    history += [AIMessage(streamed), HumanMessage("And again?")]
    third = llm.invoke(history)
    assert third.response_metadata.get("finish_reason") in {"stop", "length"}
    info = session_record(live, session)
    assert info["turn"] == 3 and info["version"] == 4 and len(info["turns"]) == 4, info


def test_llama_index_openai_like_chat_stream_and_session(live):
    pytest.importorskip("llama_index.llms.openai_like", reason="pip install llama-index-llms-openai-like")
    from llama_index.core.llms import ChatMessage, MessageRole
    from llama_index.llms.openai_like import OpenAILike

    session = _sid("llamaindex")
    llm = OpenAILike(model=MODEL, api_base=f"{live.url}/v1", api_key="local", is_chat_model=True,
                     context_window=512, max_tokens=6, temperature=0, max_retries=0, timeout=60,
                     default_headers={"X-Session-ID": session})
    history = [ChatMessage(role=MessageRole.USER, content="My name is Ada.")]
    first = llm.chat(history)
    assert first.message.role == MessageRole.ASSISTANT and isinstance(first.message.content, str)
    assert first.raw.usage.completion_tokens > 0
    info = session_record(live, session)
    assert info["turn"] == 1 and info["version"] == 2, info

    history += [first.message, ChatMessage(role=MessageRole.USER, content="What is my name?")]
    chunks = list(llm.stream_chat(history))
    streamed = "".join(c.delta or "" for c in chunks)
    assert chunks and streamed.strip() and chunks[-1].message.content == streamed
    info = session_record(live, session)
    assert info["turn"] == 2 and info["version"] == 3, info  # the first exchange was recognised, not replayed

    history += [ChatMessage(role=MessageRole.ASSISTANT, content=streamed),
                ChatMessage(role=MessageRole.USER, content="And again?")]
    third = llm.chat(history)
    assert third.raw.choices[0].finish_reason in {"stop", "length"}
    assert third.raw.deltamem["replayed"] is False and third.raw.deltamem["kv_cache"] == "hot"
    info = session_record(live, session)
    assert info["turn"] == 3 and info["version"] == 4 and len(info["turns"]) == 4, info


@pytest.fixture
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list at import
    return pytest.importorskip("litellm", reason="pip install litellm")


def test_litellm_completion_and_stream(live, litellm):
    session = _sid("litellm")
    common = {"model": f"openai/{MODEL}", "api_base": f"{live.url}/v1", "api_key": "local", "max_tokens": 6,
              "temperature": 0, "extra_headers": {"X-Session-ID": session}, "timeout": 60}
    messages = [{"role": "user", "content": "My name is Ada."}]
    r = litellm.completion(messages=messages, **common)
    reply = r.choices[0].message.content
    assert isinstance(reply, str) and r.usage.completion_tokens > 0
    assert session_record(live, session)["turn"] == 1

    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "What is my name?"}]
    parts = [c.choices[0].delta.content or "" for c in litellm.completion(messages=messages, stream=True, **common)
             if c.choices]
    assert "".join(parts).strip(), parts
    info = session_record(live, session)
    assert info["turn"] == 2 and info["version"] == 3, info
