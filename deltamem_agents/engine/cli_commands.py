"""The ``deltamem chat`` and ``deltamem sessions`` subcommands (registered by :mod:`deltamem_agents.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="session store URL (default: SQLite in the deltamem cache dir)")
    p.add_argument("--namespace", default="default", help="session namespace (tenant)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF dir, GGUF file or hub id (default: the embedded model)")
    p.add_argument("--adapter", default=None, help="adapter directory, or 'none' (default: the shipped adapter)")


def _engine(args: argparse.Namespace, **kwargs: Any):
    from .engine import MemoryEngine

    return MemoryEngine(args.model, adapter=args.adapter, store=args.store, namespace=args.namespace, **kwargs)


def _open_store(args: argparse.Namespace):
    from ..store import open_store

    return open_store(args.store)


# ------------------------------------------------------------------------------------------------ chat
def _cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args, mode=args.mode, window_tokens=args.window_tokens)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, history="append")

    def turn(text: str) -> None:
        result = None
        for chunk in engine.stream(args.session, [{"role": "user", "content": text}], **options):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            result = chunk.result or result
        sys.stdout.write("\n")
        if args.verbose and result is not None:
            u = result.usage
            print(f"[turn {result.turn} | prompt {u.prompt_tokens} | generated {u.completion_tokens} | "
                  f"written {u.written_tokens} | full context would be {u.full_context_tokens}]", file=sys.stderr)

    try:
        if args.system:
            engine.write(args.session, [{"role": "system", "content": args.system}], history="append")
        if args.message is not None:
            turn(args.message)
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            info = engine.get_session(args.session) if engine.store.exists(args.session, namespace=args.namespace) else None
            where = f"turn {info.turn}" if info else "new session"
            print(f"session {args.namespace}/{args.session} ({where}) — /reset forgets, /exit quits", file=sys.stderr)
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                if engine.store.exists(args.session, namespace=args.namespace):
                    engine.reset(args.session)
                print("(session reset)", file=sys.stderr)
                continue
            turn(text)
    except KeyboardInterrupt:
        return 130
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ sessions
def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "session_id": info.session_id, "namespace": info.namespace, "turn": info.turn, "version": info.version,
        "updated_at": info.updated_at.isoformat(), "model_fingerprint": info.model_fingerprint[:16],
        "adapter_fingerprint": info.adapter_fingerprint[:16],
    }


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    elif isinstance(obj, list):
        for row in obj:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


def _cmd_sessions(args: argparse.Namespace) -> int:
    from ..store.base import StoreError

    action = args.action
    try:
        if action in ("export", "import"):
            engine = _engine(args)
            try:
                if action == "export":
                    path = engine.export_session(args.session, args.path, turn=args.turn)
                    print(path)
                else:
                    _print(_info_dict(engine.import_session(args.path, args.session)), args.json)
            finally:
                engine.close()
            return 0
        store = _open_store(args)
        ns = args.namespace
        try:
            if action == "list":
                infos = store.list_sessions(namespace=None if args.all else ns, limit=args.limit)
                _print([_info_dict(i) for i in infos], args.json)
            elif action == "show":
                st = store.stats(args.session, namespace=ns)
                data = store.load(args.session, namespace=ns)
                out = _info_dict(st.info) | {
                    "snapshots": st.turns, "written_messages": st.written_messages,
                    "written_tokens": st.written_tokens, "state_bytes": st.state_bytes,
                    "stored_bytes": st.stored_bytes,
                    "window": [f"[{w.index}] {w.role}: {w.content[:80]}" for w in data.window],
                }
                _print(out, args.json)
            elif action == "fork":
                _print(_info_dict(store.fork(args.session, args.new_session, namespace=ns, turn=args.turn)), args.json)
            elif action == "rollback":
                _print(_info_dict(store.rollback(args.session, namespace=ns, turn=args.turn)), args.json)
            elif action == "reset":
                _print(_info_dict(store.reset(args.session, namespace=ns)), args.json)
            elif action == "delete":
                store.delete(args.session, namespace=ns)
                print(f"deleted {ns}/{args.session}")
        finally:
            store.close()
    except (StoreError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``chat`` and ``sessions`` to the ``deltamem`` parser."""
    chat = sub.add_parser("chat", help="chat with memory (interactive, or one turn with --message)")
    chat.add_argument("--session", required=True, help="session id (created on first use)")
    chat.add_argument("--message", default=None, help="send one message, print the answer and exit")
    chat.add_argument("--system", default=None, help="write a system message into the session first")
    chat.add_argument("--mode", default="windowed", choices=("windowed", "online", "state-only"))
    chat.add_argument("--window-tokens", type=int, default=1024)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--verbose", "-v", action="store_true", help="print token usage after every turn")
    _store_args(chat)
    _model_args(chat)
    chat.set_defaults(func=_cmd_chat)

    sessions = sub.add_parser("sessions", help="manage stored sessions").add_subparsers(dest="action", required=True)

    def add(name: str, help_: str, *, model: bool = False) -> argparse.ArgumentParser:
        p = sessions.add_parser(name, help=help_)
        _store_args(p)
        p.add_argument("--json", action="store_true", help="JSON output")
        if model:
            _model_args(p)
        p.set_defaults(func=_cmd_sessions)
        return p

    p = add("list", "list sessions (most recently updated first)")
    p.add_argument("--all", action="store_true", help="all namespaces")
    p.add_argument("--limit", type=int, default=100)
    add("show", "a session's header, sizes and window").add_argument("session")
    p = add("fork", "copy a session to a new id")
    p.add_argument("session")
    p.add_argument("new_session")
    p.add_argument("--turn", type=int, default=None, help="fork as of this turn (default: latest)")
    p = add("rollback", "go back to a turn (later turns are dropped)")
    p.add_argument("session")
    p.add_argument("turn", type=int)
    add("reset", "forget everything the session holds").add_argument("session")
    add("delete", "delete a session and everything it owns").add_argument("session")
    p = add("export", "write a session to a portable .safetensors file", model=True)
    p.add_argument("session")
    p.add_argument("path")
    p.add_argument("--turn", type=int, default=None)
    p = add("import", "create a session from an exported file", model=True)
    p.add_argument("path")
    p.add_argument("--session", default=None, help="new session id (default: the exported id)")
