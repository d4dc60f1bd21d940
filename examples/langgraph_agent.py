"""A LangGraph agent with a thread id that remembers across restarts (checkpoints + δ-mem session).

    python examples/langgraph_agent.py --store sqlite:////tmp/demo.db "My name is Ada and I write Rust."
    python examples/langgraph_agent.py --store sqlite:////tmp/demo.db "What do I write?"
    python examples/langgraph_agent.py --store sqlite:////tmp/demo.db --fork ada-experiment "..."
    python examples/langgraph_agent.py --store sqlite:////tmp/demo.db --delete

The graph's checkpoints go to a SQLite file beside the session store (``--checkpoints``), so both halves of the
thread survive the restart: the messages (LangGraph) and the memory state (δ-mem). ChatDeltaMem takes the
thread id from the run's config as its session id. ``--fork`` copies the thread (checkpoints copied, session
forked) and continues in the copy; ``--delete`` deletes both halves (langchain_deltamem.DeltaMemThreads).
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, parser  # noqa: E402


def default_checkpoints(store: str | None) -> Path:
    if store and store.startswith("sqlite:///"):
        return Path(store[len("sqlite:///"):]).with_suffix(".checkpoints.db")
    return Path(tempfile.gettempdir()) / "deltamem-langgraph-example.checkpoints.db"


def build_graph(llm, checkpointer):
    from langgraph.graph import START, MessagesState, StateGraph

    def call_model(state: MessagesState):
        # No session id here: ChatDeltaMem reads the thread id of the run from the current runnable config.
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_edge(START, "model")
    return builder.compile(checkpointer=checkpointer)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("message", nargs="?", default="Hello! Remember that my favourite language is Rust.")
    p.add_argument("--thread", default="langgraph-demo", help="LangGraph thread id (= δ-mem session id)")
    p.add_argument("--checkpoints", default=None, help="SQLite file of the LangGraph checkpoints")
    p.add_argument("--fork", default=None, metavar="NEW_THREAD", help="copy the thread to NEW_THREAD and use it")
    p.add_argument("--delete", action="store_true", help="delete the thread (checkpoints and session) and exit")
    args = p.parse_args(argv)

    from langchain_core.messages import HumanMessage
    from langchain_deltamem import ChatDeltaMem, DeltaMemThreads
    from langgraph.checkpoint.sqlite import SqliteSaver

    llm = ChatDeltaMem(model=args.model, adapter=args.adapter, store=args.store, max_tokens=args.max_new_tokens)
    path = Path(args.checkpoints) if args.checkpoints else default_checkpoints(args.store)
    checkpointer = SqliteSaver(sqlite3.connect(path, check_same_thread=False))
    threads = DeltaMemThreads(checkpointer, llm)
    engine = llm.get_engine()
    if args.delete:
        existed = threads.delete(args.thread)
        print(f"deleted thread {args.thread!r} (checkpoints and {'its' if existed else 'no'} δ-mem session)")
        return 0
    thread = args.thread
    if args.fork:
        threads.copy(args.thread, args.fork)
        print(f"forked {args.thread!r} -> {args.fork!r}")
        thread = args.fork
    graph = build_graph(llm, checkpointer)
    config = {"configurable": {"thread_id": thread}}
    before = len(graph.get_state(config).values.get("messages", []))
    print(f"thread {thread!r}: {before} messages in checkpoints; {describe(engine, thread)}")
    state = graph.invoke({"messages": [HumanMessage(args.message)]}, config)
    reply = state["messages"][-1]
    print(f"user: {args.message}\nassistant: {reply.content}")
    meta = reply.response_metadata
    print(f"session {meta['session_id']!r} turn {meta['turn']}; prompt tokens {reply.usage_metadata['input_tokens']}")
    print(describe(engine, thread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
