"""The ``deltamem chat`` and ``deltamem sessions`` subcommands (registered by :mod:`deltamem_agents.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="session store URL (default: SQLite in the deltamem cache dir)")
    p.add_argument("--namespace", default="default", help="session namespace (tenant)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF dir, GGUF file or hub id (default: the embedded model)")
    p.add_argument("--adapter", default=None, help="adapter directory, or 'none' (a fresh, untrained adapter) "
                   "(default: the shipped adapter; a fresh one when none is installed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: CUDA when present, else the CPU)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="the base model's precision (default: bfloat16 on CUDA, float32 on the CPU); the adapter "
                   "and the state stay float32")


def _engine(args: argparse.Namespace, **kwargs: Any):
    from .engine import MemoryEngine

    return MemoryEngine(args.model, adapter=args.adapter, store=args.store, namespace=args.namespace,
                        device=getattr(args, "device", None), dtype=getattr(args, "dtype", None), **kwargs)


def _open_store(args: argparse.Namespace):
    from ..store import open_store

    return open_store(args.store)


# ------------------------------------------------------------------------------------------------ chat
STOPPED_NOTHING_SAVED = "(stopped — nothing of this turn was saved)"

MODE_HELP = """what the model sees of earlier turns (default: %(default)s):
online: the conversation stays in the prompt as far as the context window allows, with its KV cache kept hot between turns; every message is also written into the δ-mem state.
windowed: only the last --window-tokens of text stay in the prompt; older messages live only in the state.
state-only: only the current turn is text; everything older lives only in the state.
With an untrained adapter (--adapter none, or the fresh one used when no trained adapter is installed) the state carries essentially nothing, so only what is in the prompt is remembered."""


class _Thinking:
    """A spinner ("⠋ thinking…") on stderr while the model works before text arrives (model load, prefill).

    Only when stderr is a terminal: nothing is printed otherwise. :meth:`stop` erases it; both are idempotent.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    INTERVAL_S = 0.1

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._shown = False
        self._stream: Any = None

    @staticmethod
    def _is_tty(stream: Any) -> bool:
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError, OSError):
            return False

    @property
    def active(self) -> bool:
        return self._thread is not None

    def start(self, label: str = "thinking…") -> None:
        stream = sys.stderr
        if self._thread is not None or not self._is_tty(stream):
            return
        self._stream, self._shown = stream, False
        self._done.clear()
        self._thread = threading.Thread(target=self._spin, args=(label,), name="deltamem-thinking", daemon=True)
        self._thread.start()

    def _spin(self, label: str) -> None:
        i = 0
        while not self._done.wait(self.INTERVAL_S):
            # each frame clears the line first (a library's progress bar may have written on it)
            self._stream.write(f"\r\x1b[K{self.FRAMES[i % len(self.FRAMES)]} {label}")
            self._stream.flush()
            self._shown = True
            i += 1

    def stop(self) -> None:
        if self._thread is None:
            return
        self._done.set()
        self._thread.join()
        self._thread = None
        if self._shown:
            self._stream.write("\r\x1b[K")  # back to the line's start, erase it
            self._stream.flush()
            self._shown = False


@contextlib.contextmanager
def _no_progress_bars(active: bool) -> Iterator[None]:
    """Silence transformers' progress bars (while the spinner runs: a bar's line would be left on screen)."""
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _saved_turn(engine: Any, args: argparse.Namespace) -> int | None:
    """The session's committed turn (0 when it does not exist yet); ``None`` when the store cannot say."""
    try:
        if not engine.store.exists(args.session, namespace=args.namespace):
            return 0
        return engine.get_session(args.session, namespace=args.namespace).turn
    except Exception:  # noqa: BLE001 - only used to word the "stopped" line
        return None


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()  # a stream closed early commits nothing: the session is unchanged


def _turn(engine: Any, args: argparse.Namespace, text: str, options: dict[str, Any], thinking: _Thinking) -> bool:
    """Stream one answer to stdout; ``False`` when Ctrl-C stopped it (then nothing of the turn is saved)."""
    before = _saved_turn(engine, args)
    result = None
    stream = None
    wrote = False
    thinking.start()
    try:
        stream = engine.stream(args.session, [{"role": "user", "content": text}], **options)
        for chunk in stream:
            if chunk.text:
                thinking.stop()
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                wrote = True
            result = chunk.result or result
    except KeyboardInterrupt:
        thinking.stop()
        _close(stream)
        stream = None
        if wrote:
            sys.stdout.write("\n")
            sys.stdout.flush()
        after = _saved_turn(engine, args)
        if before is not None and after is not None and after != before:
            # Ctrl-C came after the engine had committed the turn (while it handed over the last chunk).
            print(f"(stopped — the turn had already been saved, as turn {after})", file=sys.stderr)
        else:
            print(STOPPED_NOTHING_SAVED, file=sys.stderr)
        return False
    finally:
        thinking.stop()
        if stream is not None:
            _close(stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and result is not None:
        u = result.usage
        kv = f" | kv cache {result.kv_cache}, {u.cached_tokens} reused" if result.kv_cache else ""
        print(f"[turn {result.turn} | prompt {u.prompt_tokens}{kv} | generated {u.completion_tokens} | "
              f"written {u.written_tokens} | full context would be {u.full_context_tokens}]", file=sys.stderr)
    return True


def _repl(engine: Any, args: argparse.Namespace, options: dict[str, Any], thinking: _Thinking) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        info = engine.get_session(args.session) if engine.store.exists(args.session, namespace=args.namespace) else None
        where = f"turn {info.turn}" if info else "new session"
        print(f"session {args.namespace}/{args.session} ({where}) — /reset forgets, /exit quits; "
              "Ctrl-C stops an answer, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: quit
            if interactive:
                sys.stderr.write("\n")
            return 0
        if not line:  # EOF (Ctrl-D)
            if interactive:
                sys.stderr.write("\n")
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
        _turn(engine, args, text, options, thinking)  # Ctrl-C stops this answer only


def _kv_cache_dir(args: argparse.Namespace) -> str | None:
    """``--kv-cache-dir``: a directory, ``none`` (not saved), or the default under the deltamem cache dir. Each
    ``deltamem chat --message`` is a new process: without the saved cache every such turn re-reads the whole
    conversation."""
    if args.kv_cache_dir is None:
        from ..paths import cache_dir

        return str(cache_dir() / "kv-cache")
    return None if args.kv_cache_dir.lower() in ("", "none") else args.kv_cache_dir


def _check_chat(args: argparse.Namespace) -> None:
    """Everything ``chat`` can check before the model loads (seconds): the session id and namespace, the
    message and system text, the option values, the store (it must answer) and the KV cache directory (it must be
    writable). Raises the typed errors the engine would raise later (or ``OSError`` for the directory)."""
    from ..store.base import validate_identifier
    from .messages import normalize_message
    from .options import check_int, check_seed, finite

    validate_identifier(args.session, "session id")
    validate_identifier(args.namespace, "namespace")
    if args.message is not None:
        normalize_message({"role": "user", "content": args.message})
    if args.system:
        normalize_message({"role": "system", "content": args.system})
    check_int("max_new_tokens", args.max_new_tokens, 0)
    check_int("window_tokens", args.window_tokens, 0)
    if args.protocol == "authors" and args.mode != "online":
        from .errors import InvalidOptionError

        raise InvalidOptionError("protocol", f"--protocol authors runs in --mode online only, got --mode {args.mode}")
    if args.kv_tokens is not None:
        check_int("kv_tokens", args.kv_tokens, 64)
    finite("temperature", args.temperature, low=0, low_open=False)
    finite("top_p", args.top_p, low=0, low_open=True, high=1, high_open=False)
    finite("repetition_penalty", args.repetition_penalty, low=0, low_open=True)
    check_seed(args.seed)
    _open_store(args).close()  # the store answers and is a session database (else StoreUnavailableError)
    kv_dir = _kv_cache_dir(args)
    if kv_dir is not None:
        path = Path(kv_dir).expanduser()
        hint = "cannot use the KV cache directory (--kv-cache-dir none keeps no cache files)"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"{hint}: {exc.strerror}", str(path)) from exc
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, f"{hint}: not writable", str(path))


def _cmd_chat(args: argparse.Namespace) -> int:
    from ..cli_support import apply_threads

    _check_chat(args)  # before the model loads: a typo costs no model load
    thinking = _Thinking()
    engine = None
    try:
        apply_threads(args.threads)  # before the model loads (torch sizes its thread pool once)
        thinking.start("loading the model…")
        try:
            with _no_progress_bars(thinking.active):  # the spinner stands for them
                engine = _engine(args, mode=args.mode, window_tokens=args.window_tokens,
                                 kv_tokens=args.kv_tokens, kv_cache_dir=_kv_cache_dir(args), protocol=args.protocol)
        finally:
            thinking.stop()
        if args.verbose:
            import torch

            budget = (f"KV budget {engine.kv_tokens} tokens" if args.mode == "online"
                      else f"window {args.window_tokens} tokens")
            print(f"[model {getattr(engine, 'model_name', '?')} | mode {args.mode} | {budget} | torch threads "
                  f"{torch.get_num_threads()}]", file=sys.stderr)
        options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed, history="append")
        if args.system:
            engine.write(args.session, [{"role": "system", "content": args.system}], history="append")
        if args.message is not None:
            return 0 if _turn(engine, args, args.message, options, thinking) else 130
        return _repl(engine, args, options, thinking)
    except KeyboardInterrupt:  # while the model loads, or a second Ctrl-C: quit without a traceback
        thinking.stop()
        sys.stderr.write("\n")
        return 130
    finally:
        if engine is not None:
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
    """``deltamem sessions …``; errors are reported by :func:`deltamem_agents.cli.main` (one line, exit code)."""
    action = args.action
    if action in ("export", "import"):
        engine = _engine(args)
        try:
            if action == "export":
                path = engine.export_session(args.session, args.path, namespace=args.namespace, turn=args.turn)
                print(path)
            else:
                _print(_info_dict(engine.import_session(args.path, args.session, namespace=args.namespace)),
                       args.json)
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
    return 0


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``chat`` and ``sessions`` to the ``deltamem`` parser."""
    from ..cli_support import HelpFormatter, add_threads_argument

    chat = sub.add_parser(
        "chat", help="chat with memory (interactive, or one turn with --message)", formatter_class=HelpFormatter,
        description="Chat with a session whose memory is a δ-mem state (interactive, or one turn with "
        "--message).\nCtrl-C stops the answer being generated (nothing of that turn is saved); Ctrl-C or "
        "Ctrl-D at the prompt quits.",
    )  # fmt: skip
    chat.add_argument("--session", required=True, help="session id (created on first use)")
    chat.add_argument("--message", default=None, help="send one message, print the answer and exit")
    chat.add_argument("--system", default=None, help="write a system message into the session first")
    chat.add_argument("--mode", default="online", choices=("online", "windowed", "state-only"), help=MODE_HELP)
    chat.add_argument("--protocol", default="deltamem", choices=("deltamem", "authors"),
                      help="what a turn writes (default: %(default)s): deltamem writes the reply after it is "
                      "generated, as the message it returns; authors (online mode only) reproduces the authors' "
                      "chat protocol: the generation header and every generated token are written as they run")
    chat.add_argument("--window-tokens", type=int, default=1024,
                      help="windowed mode: tokens of the most recent text kept in the prompt")
    chat.add_argument("--kv-tokens", type=int, default=None,
                      help="online mode: the KV budget of the session (default: the model's context window)")
    chat.add_argument("--kv-cache-dir", default=None,
                      help="online mode: where the session's KV cache is saved between runs, so the next "
                      "`deltamem chat` skips re-reading the conversation ('none': not saved) "
                      "(default: kv-cache/ in the deltamem cache dir)")
    chat.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    chat.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (0: greedy, deterministic)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    chat.add_argument("--repetition-penalty", type=float, default=1.1,
                      help="penalty on tokens the answer already generated (1: none; the prompt is never penalised)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible answers)")
    chat.add_argument("--verbose", "-v", action="store_true",
                      help="print the model and thread count, and token usage after every turn")
    add_threads_argument(chat)
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
    p.add_argument("--limit", type=_non_negative, default=100)
    add("show", "a session's header, sizes and window").add_argument("session")
    p = add("fork", "copy a session to a new id")
    p.add_argument("session")
    p.add_argument("new_session")
    p.add_argument("--turn", type=_non_negative, default=None, help="fork as of this turn (default: latest)")
    p = add("rollback", "go back to a turn (later turns are dropped)")
    p.add_argument("session")
    p.add_argument("turn", type=_non_negative)
    add("reset", "forget everything the session holds").add_argument("session")
    add("delete", "delete a session and everything it owns").add_argument("session")
    p = add("export", "write a session to a portable .safetensors file", model=True)
    p.add_argument("session")
    p.add_argument("path")
    p.add_argument("--turn", type=_non_negative, default=None)
    p = add("import", "create a session from an exported file", model=True)
    p.add_argument("path")
    p.add_argument("--session", default=None, help="new session id (default: the exported id)")
