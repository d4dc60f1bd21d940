"""DeltaMemLLM on the embedded model: the LLM interface, session routing, and LlamaIndex's chat engine and agents.

Replies are capped at a few tokens: these tests check plumbing and session state, not answer quality (a 135M
model does not follow the ReAct format reliably; the agent tests assert what the run does, documented in
``docs/integrations/llamaindex.md``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402
from llama_index.llms.deltamem import DeltaMemLLM, current_session, session_scope  # noqa: E402

from deltamem_agents.engine.engine import DEFAULT_MAX_NEW_TOKENS  # noqa: E402
from deltamem_agents.integrations import EPHEMERAL_PREFIX  # noqa: E402
from deltamem_agents.integrations.testing import FakeEngine  # noqa: E402

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def llm(deltamem_engine):
    return DeltaMemLLM(engine=deltamem_engine, max_new_tokens=2)


def _turn(engine, session_id: str) -> int:
    return engine.get_session(session_id).turn


def test_metadata_is_honest(llm, deltamem_engine):
    meta = llm.metadata
    assert meta.context_window == deltamem_engine.context_window
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is False
    assert meta.num_output == 2
    assert meta.model_name == deltamem_engine.model_name
    # num_output of an LLM that leaves max_new_tokens to the engine: the engine's default
    assert DeltaMemLLM(engine=deltamem_engine).metadata.num_output == deltamem_engine.max_new_tokens
    assert DeltaMemLLM(engine=FakeEngine()).metadata.num_output == DEFAULT_MAX_NEW_TOKENS


def test_chat_complete_and_streams(llm, deltamem_engine):
    view = llm.for_session("li-sync")
    msgs = [ChatMessage(role=MessageRole.USER, content="Say hi.")]
    response = view.chat(msgs)
    assert response.message.role == MessageRole.ASSISTANT
    assert response.raw["session_id"] == "li-sync"
    assert response.raw["version"] == deltamem_engine.get_session("li-sync").version
    assert response.raw["mode"] == "online" and response.raw["kv_cache"] in ("new", "rebuilt")
    assert response.additional_kwargs == response.raw["usage"]
    assert response.raw["usage"]["completion_tokens"] <= 2
    assert response.raw["usage"]["prompt_tokens"] > 0
    streamed = list(view.stream_chat([*msgs, response.message, ChatMessage(role="user", content="Again.")]))
    assert streamed and streamed[-1].raw is not None
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].message.content
    completion = view.complete("One word: sky colour?")
    assert isinstance(completion.text, str) and completion.raw["turn"] == 3
    pieces = list(view.stream_complete("And grass?"))
    assert pieces[-1].raw["turn"] == 4
    assert _turn(deltamem_engine, "li-sync") == 4


async def test_async_variants(llm, deltamem_engine):
    view = llm.for_session("li-async")
    response = await view.achat([ChatMessage(role="user", content="Hello!")])
    assert response.raw["session_id"] == "li-async"
    chunks = [c async for c in await view.astream_chat([ChatMessage(role="user", content="Hello!"),
                                                         response.message,
                                                         ChatMessage(role="user", content="Bye.")])]
    assert chunks[-1].raw["turn"] == 2
    completion = await view.acomplete("Hi")
    assert completion.raw["turn"] == 3
    pieces = [p async for p in await view.astream_complete("Ok")]
    assert pieces[-1].raw["turn"] == 4


def test_session_routing_order():
    """kwarg > for_session view > session_scope > field > throwaway (no model needed)."""
    engine = FakeEngine()
    llm = DeltaMemLLM(engine=engine, max_new_tokens=1)
    msg = [ChatMessage(role="user", content="Hi")]
    with session_scope("li-scope"):
        assert current_session() == "li-scope"
        assert llm.chat(msg).raw["session_id"] == "li-scope"  # the context variable
        assert llm.for_session("li-view").chat(msg).raw["session_id"] == "li-view"  # a view wins
        assert llm.chat(msg, session_id="li-kwarg").raw["session_id"] == "li-kwarg"  # the call wins
        stream = llm.stream_chat(msg)  # resolved when called, not when consumed
    assert current_session() is None
    assert list(stream)[-1].raw["session_id"] == "li-scope"
    assert DeltaMemLLM(engine=engine, session_id="li-field").chat(msg).raw["session_id"] == "li-field"
    before, calls = set(engine.sessions), len(engine.calls)
    response = llm.chat(msg)  # no session anywhere: a throwaway on the engine's twin, deleted after the call
    assert response.raw["session_id"] is None and response.raw["version"] is None
    assert len(engine.calls) == calls and set(engine.sessions) == before  # the engine itself was not called
    assert engine.ephemeral.calls[-1]["session_id"].startswith(EPHEMERAL_PREFIX)
    assert engine.ephemeral.calls[-1]["history"] == "full" and engine.ephemeral.sessions == {}
    llm.complete("x", session_id="opts", temperature=0.5, top_k=2, stop=["\n"], max_tokens=3)
    call = engine.calls[-1]
    assert (call["temperature"], call["top_k"], call["stop"], call["max_new_tokens"]) == (0.5, 2, ["\n"], 3)
    assert "top_p" not in call and "repetition_penalty" not in call  # unset: the engine's defaults
    DeltaMemLLM(engine=engine).chat(msg, session_id="defaults")
    assert not {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "on_divergence"} & set(
        engine.calls[-1])
    llm.chat(msg, session_id="opts", on_divergence="rollback")  # passed through only when set
    assert engine.calls[-1]["on_divergence"] == "rollback"
    DeltaMemLLM(engine=engine, on_divergence="reject").chat(msg, session_id="opts")
    assert engine.calls[-1]["on_divergence"] == "reject"


def test_a_call_without_session_leaves_nothing_in_the_store(llm, deltamem_engine):
    before = {s.session_id for s in deltamem_engine.list_sessions(limit=10_000)}
    response = llm.chat([ChatMessage(role="user", content="Hello there.")])
    pieces = list(llm.stream_complete("And again."))
    assert response.raw["session_id"] is None and response.raw["turn"] is None
    assert pieces[-1].raw["session_id"] is None and response.raw["usage"]["completion_tokens"] > 0
    assert {s.session_id for s in deltamem_engine.list_sessions(limit=10_000)} == before


async def test_session_scope_reaches_tasks_started_inside():
    import asyncio

    engine = FakeEngine()
    llm = DeltaMemLLM(engine=engine)
    with session_scope("li-task"):
        task = asyncio.ensure_future(llm.achat([ChatMessage(role="user", content="Hi")]))
    response = await task
    assert response.raw["session_id"] == "li-task"


def test_simple_chat_engine_remembers_across_instances(llm, deltamem_engine):
    from llama_index.core.chat_engine import SimpleChatEngine

    chat_engine = SimpleChatEngine.from_defaults(llm=llm.for_session("li-simple"))
    chat_engine.chat("My favourite colour is teal.")
    first = _turn(deltamem_engine, "li-simple")
    chat_engine.chat("What is my favourite colour?")
    assert _turn(deltamem_engine, "li-simple") == first + 1
    # A new chat engine (a restart: no chat history) on the same session continues the same state.
    fresh = SimpleChatEngine.from_defaults(llm=llm.for_session("li-simple"))
    fresh.chat("Remind me of my colour.")
    stats = deltamem_engine.stats("li-simple")
    assert stats.info.turn == first + 2
    assert stats.written_messages >= 6  # three user messages and three replies (history was appended)


async def test_react_agent_run_completes_and_advances_the_session(llm, deltamem_engine):
    from llama_index.core.agent.workflow import ReActAgent

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    agent = ReActAgent(tools=[add], llm=llm.model_copy(update={"max_new_tokens": 24}), streaming=False)
    with session_scope("li-react"):
        handler = agent.run("What is 2 + 3? Use the add tool.", max_iterations=2)
    try:
        result = await handler
    except Exception as exc:  # documented: a 135M model may exhaust the iterations without a parsable answer
        assert "max iterations" in str(exc).lower() or "Reached max" in str(exc), exc
    else:
        assert result.response is not None
    assert _turn(deltamem_engine, "li-react") >= 1


async def test_agent_workflow_picks_react_for_this_llm(llm, deltamem_engine):
    from llama_index.core.agent.workflow import AgentWorkflow, ReActAgent

    def lookup(term: str) -> str:
        """Look a term up."""
        return f"{term}: a thing"

    workflow = AgentWorkflow.from_tools_or_functions([lookup], llm=llm.model_copy(update={"max_new_tokens": 16}))
    assert isinstance(next(iter(workflow.agents.values())), ReActAgent)  # not function-calling: ReAct
    with session_scope("li-workflow"):
        handler = workflow.run(user_msg="Hello", max_iterations=1)
    try:
        await handler
    except Exception as exc:
        assert "max iterations" in str(exc).lower(), exc
    assert _turn(deltamem_engine, "li-workflow") >= 1


async def test_function_agent_is_refused_honestly(llm):
    from llama_index.core.agent.workflow import FunctionAgent

    def noop() -> str:
        """Do nothing."""
        return "ok"

    agent = FunctionAgent(tools=[noop], llm=llm)
    with pytest.raises(Exception, match="FunctionCallingLLM"):
        await agent.run("hi")
