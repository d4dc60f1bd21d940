"""A coding assistant that learns a project's naming conventions, then applies them after a restart.

Run it twice — two processes, one session store:

    python examples/coding_assistant.py learn --store sqlite:////tmp/demo.db
    python examples/coding_assistant.py apply --store sqlite:////tmp/demo.db

``learn`` writes the conventions into the session (``engine.write``: no generation needed; each convention is
acknowledged by an assistant turn, as in a real conversation). ``apply`` runs in a new process, in
``state-only`` mode: the conventions are NOT in the prompt (it holds only the system message and the question),
only in the δ-mem state. It prints the session's stats before answering, which shows that the state carried over,
and asks the same question in a throwaway session with nothing learned: if both answers are the same, the
memory did not change the answer — the model answered from its prior.

Be realistic about the reply: the embedded model has 135M parameters, and the state is a compressed associative
trace (an 8×8 matrix per layer), not a copy of the text. With an untrained or lightly trained adapter the reply
will usually NOT follow the conventions, and the script says so. Run ``apply --mode windowed`` to compare with
the conventions' text in the prompt window.
"""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, parser  # noqa: E402

SESSION = "coding-assistant"
CONVENTIONS = [
    "In this project every function name is snake_case and starts with a verb, e.g. load_config, parse_header.",
    "Classes are PascalCase and end with a role suffix, e.g. ConfigLoader, HeaderParser.",
    "Constants are UPPER_SNAKE_CASE and prefixed with the module name, e.g. HTTP_TIMEOUT_SECONDS.",
    "Test files are named test_<module>.py and test functions test_<behaviour>.",
]
QUESTION = "Name a function that reads a user's profile and a class that caches it, following our conventions."
_VERBS = ("load", "read", "get", "fetch", "parse", "cache", "build", "make")


def follows_conventions(text: str) -> bool:
    """Crude check: a snake_case function starting with a verb, and a PascalCase class of two or more words
    ending in a role (e.g. ProfileCache, ProfileLoader)."""
    functions = re.findall(r"\b([a-z]+(?:_[a-z0-9]+)+)\b", text)
    classes = re.findall(r"\b([A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)+)\b", text)
    good_function = any(f.split("_")[0] in _VERBS for f in functions)
    good_class = any(re.search(r"(Cache|Loader|Reader|Store|Repository|Manager|Service)$", c) for c in classes)
    return good_function and good_class


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("phase", choices=["learn", "apply"], help="learn the conventions, or apply them (new process)")
    p.add_argument("--mode", default="state-only", choices=["state-only", "windowed", "online"],
                   help="mode of the apply phase (default state-only: the conventions are only in the state)")
    p.add_argument("--session", default=SESSION)
    args = p.parse_args(argv)

    from deltamem_agents import MemoryEngine

    with MemoryEngine(args.model, adapter=args.adapter, store=args.store) as engine:
        print(f"model {engine.model_name}; {describe(engine, args.session)}")
        if args.phase == "learn":
            messages = [{"role": "system", "content": "You are a coding assistant for one project."}]
            for convention in CONVENTIONS:
                messages += [{"role": "user", "content": convention}, {"role": "assistant", "content": "Noted."}]
            result = engine.write(args.session, messages)
            print(f"learned: wrote {result.written_messages} messages ({result.written_tokens} tokens)")
            print(describe(engine, args.session))
            print("now restart: python examples/coding_assistant.py apply" + (f" --store {args.store}"
                                                                             if args.store else ""))
            return 0
        if engine.stats(args.session).written_messages == 0:
            print("nothing learned yet: run the 'learn' phase first", file=sys.stderr)
            return 1
        question = [{"role": "user", "content": QUESTION}]
        reply = engine.chat(args.session, question, mode=args.mode, history="append",
                            max_new_tokens=args.max_new_tokens)
        print(f"[{args.mode}] Q: {QUESTION}")
        print(f"[{args.mode}] A: {reply.text}")
        print(f"prompt tokens: {reply.usage.prompt_tokens} (a full-context prompt would need "
              f"{reply.usage.full_context_tokens})")
        baseline_id = f"baseline-{uuid.uuid4().hex[:12]}"
        try:
            baseline = engine.chat(baseline_id, [{"role": "system", "content": "You are a coding assistant for one "
                                                  "project."}, *question], mode=args.mode,
                                   max_new_tokens=args.max_new_tokens)
        finally:
            engine.delete(baseline_id)
        print(f"[no memory] A: {baseline.text}")
        follows = follows_conventions(reply.text)
        print(f"follows the conventions (crude check): {'yes' if follows else 'no'}; "
              f"without memory: {'yes' if follows_conventions(baseline.text) else 'no'}")
        if reply.text == baseline.text:
            print("the answer is identical to the no-memory answer: the state did not change it (expected with "
                  "an untrained or lightly trained adapter on a 135M model)")
        print(describe(engine, args.session))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
