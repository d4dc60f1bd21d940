"""ChatDeltaMem beyond the standard suites: session routing, metadata, callbacks, idempotent resends, honest
capabilities, and LangGraph threads (checkpoints and δ-mem sessions deleted and copied together)."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.exceptions import OutputParserException  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_deltamem import ChatDeltaMem, DeltaMemThreads, thread_id_from_config  # noqa: E402
from langchain_deltamem._parsing import extract_json, parse_tool_calls, template_supports_tools  # noqa: E402
from langchain_deltamem.engines import engine_key  # noqa: E402

from deltamem_agents.engine import HistoryConflictError  # noqa: E402
from deltamem_agents.engine.engine import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING  # noqa: E402
from deltamem_agents.integrations import EPHEMERAL_PREFIX  # noqa: E402
from deltamem_agents.integrations.testing import FakeEngine  # noqa: E402

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def llm(deltamem_engine):
    return ChatDeltaMem(engine=deltamem_engine, max_tokens=2)


def _sessions(engine) -> set[str]:
    return {s.session_id for s in engine.list_sessions(limit=10_000)}


# ---------------------------------------------------------------------------------------------- no model needed
def test_parsers_and_helpers():
    assert extract_json('Sure! ```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('prefix {"b": [1, 2]} suffix') == {"b": [1, 2]}
    with pytest.raises(OutputParserException):
        extract_json('{"title": "Joke", "description": "J')
    content, calls, invalid = parse_tool_calls(
        'Let me add.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call><tool_call>oops</tool_call>'
    )
    assert content == "Let me add."
    assert [(c["name"], c["args"]) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert len(invalid) == 1
    assert parse_tool_calls("plain text") == ("plain text", [], [])
    assert thread_id_from_config({"configurable": {"thread_id": "t1"}}) == "t1"
    assert thread_id_from_config({"metadata": {"thread_id": 7}}) == "7"
    assert thread_id_from_config({}) is None
    assert engine_key(None, "none", "sqlite:///x.db") == engine_key(None, "none", "sqlite:///x.db")
    assert engine_key(None, None, "sqlite:///x.db") != engine_key(None, None, "sqlite:///y.db")


def test_defaults_and_params():
    model = ChatDeltaMem(max_new_tokens=7, stop_sequences=["\n"])
    assert model.max_tokens == 7 and model.stop == ["\n"]
    assert model.cache is False  # a cache hit would skip the memory write
    assert model._get_ls_params() == {
        "ls_provider": "deltamem", "ls_model_name": "SmolLM2-135M-Instruct", "ls_model_type": "chat",
        "ls_temperature": DEFAULT_SAMPLING.temperature, "ls_max_tokens": 7, "ls_stop": ["\n"],
    }
    # Generation defaults are the engine's (one source of truth); a field or a call's keyword wins.
    plain = ChatDeltaMem()
    assert (plain.temperature, plain.max_tokens, plain.top_p, plain.repetition_penalty) == (None, None, None, None)
    ls = plain._get_ls_params(temperature=0.7)
    assert ls["ls_temperature"] == 0.7 and ls["ls_max_tokens"] == DEFAULT_MAX_NEW_TOKENS
    structured = model.with_structured_output({"title": "T", "type": "object", "properties": {"x": {"type": "integer"}}})
    assert structured is not None
    with pytest.raises(ValueError):
        model.with_structured_output(None, method="json_schema")


# ---------------------------------------------------------------------------------------------- on the model
def test_tools_are_declined_for_a_template_without_tools(llm, deltamem_engine):
    assert template_supports_tools(deltamem_engine.tokenizer) is False
    assert llm.supports_tools() is False
    with pytest.raises(NotImplementedError, match="does not render tools"):
        llm.bind_tools([])


def test_metadata_usage_and_callbacks(llm, deltamem_engine):
    tokens: list[str] = []

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token, **kwargs):
            tokens.append(token)

    msg = llm.invoke("Hi!", session_id="lc-meta", config={"callbacks": [Collect()]}, max_tokens=3)
    meta = msg.response_metadata
    assert meta["model_name"] == deltamem_engine.model_name
    assert meta["session_id"] == "lc-meta" and meta["turn"] == 1 and meta["replayed"] is False
    assert meta["version"] == deltamem_engine.get_session("lc-meta").version
    assert meta["finish_reason"] in ("stop", "length")
    assert meta["mode"] == "online" and meta["kv_cache"] in ("new", "rebuilt")
    assert meta["written_tokens"] == meta["usage"]["written_tokens"] > 0
    usage = msg.usage_metadata
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 3
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_token_details"]["cache_read"] == meta["usage"]["cached_tokens"]
    assert "".join(tokens) == msg.content  # ``invoke`` streamed through the callbacks (one streaming core)


def test_session_routing_order():
    """kwarg / bind > LangGraph thread id (configurable, then metadata) > field > throwaway (no model needed)."""
    engine = FakeEngine()
    llm = ChatDeltaMem(engine=engine, max_tokens=1)

    def sid(message):
        return message.response_metadata["session_id"]

    assert sid(llm.invoke("a", session_id="lc-kwarg")) == "lc-kwarg"
    assert sid(llm.bind(session_id="lc-bound").invoke("a")) == "lc-bound"
    cfg = {"configurable": {"thread_id": "lc-thread"}}
    assert sid(llm.invoke("a", config=cfg)) == "lc-thread"
    assert sid(llm.bind(session_id="lc-bound").invoke("a", config=cfg)) == "lc-bound"  # bound beats thread
    assert sid(llm.invoke("a", config={"metadata": {"thread_id": "lc-meta-thread"}})) == "lc-meta-thread"
    assert [sid(m) for m in llm.batch(["a", "b"], config=cfg)] == ["lc-thread", "lc-thread"]
    field = ChatDeltaMem(engine=engine, max_tokens=1, session_id="lc-field")
    assert sid(field.invoke("a")) == "lc-field"
    assert sid(field.invoke("a", config=cfg)) == "lc-thread"  # thread beats field
    assert sid(field.with_config(cfg).invoke("a")) == "lc-thread"
    before, calls = set(engine.sessions), len(engine.calls)
    reply = llm.invoke("a")  # no session anywhere: a throwaway on the engine's twin, deleted afterwards
    assert sid(reply) is None and reply.response_metadata["version"] is None
    assert len(engine.calls) == calls and set(engine.sessions) == before  # the engine itself was not called
    twin = engine.ephemeral
    assert twin.calls[-1]["session_id"].startswith(EPHEMERAL_PREFIX) and twin.calls[-1]["history"] == "full"
    assert twin.sessions == {}
    # per-call options reach the engine; options nobody set are left to the engine's defaults
    llm.invoke("a", session_id="opts", temperature=0.5, top_k=3, seed=1, mode="state-only", stop=["\n"])
    call = engine.calls[-1]
    assert (call["temperature"], call["top_k"], call["seed"], call["mode"], call["stop"]) == (
        0.5, 3, 1, "state-only", ["\n"])
    assert call["max_new_tokens"] == 1 and "top_p" not in call and "repetition_penalty" not in call
    ChatDeltaMem(engine=engine).invoke("a", session_id="defaults")
    assert not {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "on_divergence"} & set(
        engine.calls[-1])
    llm.invoke("a", session_id="opts", on_divergence="rollback")  # passed through only when set
    assert engine.calls[-1]["on_divergence"] == "rollback"
    ChatDeltaMem(engine=engine, on_divergence="reject").invoke("a", session_id="opts")
    assert engine.calls[-1]["on_divergence"] == "reject"
    with pytest.raises(ValueError, match="cannot switch"):
        llm.invoke("a", session_id="x", model="other-model")


def test_resent_history_is_written_once_and_edits_replay(llm, deltamem_engine):
    first = llm.invoke([SystemMessage("Be brief."), HumanMessage("I use snake_case.")], session_id="lc-resend")
    history = [SystemMessage("Be brief."), HumanMessage("I use snake_case."), first, HumanMessage("And you?")]
    second = llm.invoke(history, session_id="lc-resend")
    assert second.response_metadata["replayed"] is False
    stats = deltamem_engine.stats("lc-resend")
    assert stats.written_messages == 5  # system, user, reply, user, reply: nothing written twice
    edited = [SystemMessage("Be brief."), HumanMessage("I use camelCase."), AIMessage(first.content),
              HumanMessage("And you?")]
    with pytest.raises(HistoryConflictError):  # an edit is a conflict unless the caller opts into a rollback
        llm.invoke(edited, session_id="lc-resend")
    assert deltamem_engine.stats("lc-resend").written_messages == 5
    third = llm.invoke(edited, session_id="lc-resend", on_divergence="rollback")
    assert third.response_metadata["replayed"] is True
    assert ChatDeltaMem(engine=deltamem_engine, on_divergence="rollback", max_tokens=2).invoke(
        edited[:2], session_id="lc-resend").response_metadata["replayed"] is True


def test_a_call_without_session_leaves_nothing_in_the_store(llm, deltamem_engine):
    before = _sessions(deltamem_engine)
    msg = llm.invoke("Hello there.")
    streamed = list(llm.stream("And again."))
    assert msg.response_metadata["session_id"] is None and msg.response_metadata["turn"] is None
    assert streamed[-1].response_metadata["session_id"] is None
    assert msg.usage_metadata["output_tokens"] > 0
    assert _sessions(deltamem_engine) == before


async def test_async_stream_has_usage_on_the_last_chunk(llm):
    chunks = [c async for c in llm.astream("Hello", session_id="lc-async", max_tokens=3)]
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata is not None
    assert all(c.usage_metadata is None for c in chunks[:-1])


def test_timeout_writes_nothing(deltamem_engine):
    slow = ChatDeltaMem(engine=deltamem_engine, max_tokens=8, timeout=1e-9)
    with pytest.raises(TimeoutError):
        slow.invoke("Count to ten.", session_id="lc-timeout")
    assert not deltamem_engine.store.exists("lc-timeout")  # nothing committed, so nothing created


def test_structured_output_path_runs(llm):
    """The prompt + parse path end to end; the 135M model may or may not produce valid JSON (both handled)."""
    schema = {"title": "Colour", "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    out = llm.with_structured_output(schema, include_raw=True).invoke(
        "Name a colour.", session_id="lc-structured", max_tokens=16
    )
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert (out["parsed"] is None) == (out["parsing_error"] is not None)


# ---------------------------------------------------------------------------------------------- LangGraph
def _graph(llm, checkpointer):
    from langgraph.graph import START, MessagesState, StateGraph

    def call_model(state: MessagesState):
        return {"messages": [llm.invoke(state["messages"])]}  # the thread id comes from the run's config

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_edge(START, "model")
    return builder.compile(checkpointer=checkpointer)


@pytest.mark.parametrize("saver", ["memory", "sqlite"])
def test_langgraph_threads_follow_sessions(llm, deltamem_engine, saver, tmp_path):
    pytest.importorskip("langgraph")
    if saver == "memory":
        from langgraph.checkpoint.memory import InMemorySaver

        checkpointer = InMemorySaver()
    else:
        sqlite = pytest.importorskip("langgraph.checkpoint.sqlite")
        import sqlite3

        checkpointer = sqlite.SqliteSaver(sqlite3.connect(tmp_path / "cp.db", check_same_thread=False))
    graph = _graph(llm, checkpointer)
    thread = f"lg-{saver}"
    cfg = {"configurable": {"thread_id": thread}}
    graph.invoke({"messages": [HumanMessage("My project uses tabs.")]}, cfg)
    graph.invoke({"messages": [HumanMessage("What do we use?")]}, cfg)
    assert deltamem_engine.get_session(thread).turn == 2
    assert deltamem_engine.stats(thread).written_messages == 4  # the resent history was not written again

    threads = DeltaMemThreads(checkpointer, llm)
    assert threads.copy(thread, f"{thread}-copy") is True
    copy_cfg = {"configurable": {"thread_id": f"{thread}-copy"}}
    assert len(graph.get_state(copy_cfg).values["messages"]) == 4
    assert deltamem_engine.session_state(f"{thread}-copy").equal(deltamem_engine.session_state(thread))
    graph.invoke({"messages": [HumanMessage("Thanks.")]}, copy_cfg)  # the copy continues on its own
    assert deltamem_engine.get_session(f"{thread}-copy").turn == 3
    assert deltamem_engine.get_session(thread).turn == 2

    assert threads.delete(f"{thread}-copy") is True
    assert not threads.exists(f"{thread}-copy")
    assert graph.get_state(copy_cfg).values == {}
    assert threads.exists(thread)
