"""A LlamaIndex chat engine that remembers across restarts: the chat history is not kept, the δ-mem session is.

    python examples/llamaindex_chat.py --store sqlite:////tmp/demo.db "I am allergic to peanuts."
    python examples/llamaindex_chat.py --store sqlite:////tmp/demo.db "What am I allergic to?"

Each run builds a fresh ``SimpleChatEngine`` (empty chat history) on ``DeltaMemLLM.for_session(...)``: whatever
carries over from the first run to the second lives in the session's state (and its stored text window), which
the script shows by printing the session's stats. ``--mode state-only`` keeps the earlier turns out of the
prompt entirely, so only the state can carry them (expect little recall from the embedded 135M model with an
untrained adapter).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, parser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("message", nargs="?", default="Hi! Please remember that I am allergic to peanuts.")
    p.add_argument("--session", default="llamaindex-demo")
    p.add_argument("--mode", default="windowed", choices=["windowed", "state-only", "online"])
    args = p.parse_args(argv)

    from llama_index.core.chat_engine import SimpleChatEngine
    from llama_index.llms.deltamem import DeltaMemLLM

    llm = DeltaMemLLM(model=args.model, adapter=args.adapter, store=args.store, mode=args.mode,
                      max_new_tokens=args.max_new_tokens)
    engine = llm.get_engine()
    print(f"before: {describe(engine, args.session)}")
    chat = SimpleChatEngine.from_defaults(llm=llm.for_session(args.session))
    response = chat.chat(args.message)
    print(f"user: {args.message}\nassistant: {response.response}")
    print(f"after:  {describe(engine, args.session)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
