"""``deltamem serve`` and ``deltamem keys`` (registered by :mod:`deltamem_agents.cli`).

Importing this module needs neither FastAPI nor torch (``deltamem --help`` imports every plugin): ``serve``
imports the server when it runs, and says how to install it when the ``server`` extra is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["register"]

#: Where ``keys`` looks when no ``--store`` is given: the server's own setting, then the default SQLite file.
STORE_ENV = "DELTAMEM_STORE"

# serve's flags: (flag, settings field, type, help). Flags default to "not given", so that environment
# variables (DELTAMEM_<FIELD>) and then the settings' defaults apply.
_SERVE_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--host", "host", str, "address to listen on (default 127.0.0.1; without API keys only loopback is allowed)"),
    ("--port", "port", int, "port (default 8000)"),
    ("--store", "store", str, "session store URL, also where API keys live (default: SQLite in the cache dir)"),
    ("--model", "model", str, "HF dir, GGUF file or hub id (default: the embedded model)"),
    ("--adapter", "adapter", str, "adapter directory, or 'none' (default: the shipped adapter)"),
    ("--device", "device", str, "cpu, cuda, cuda:1, … (default: CUDA when present, else the CPU)"),
    ("--dtype", "dtype", str, "the base model's precision: float32, bfloat16, float16 or auto (default: bfloat16 "
     "on CUDA, float32 on the CPU); the adapter and the state stay float32"),
    ("--mode", "mode", str, "online (default), windowed or state-only: what the model sees of earlier turns"),
    ("--protocol", "protocol", str, "deltamem (default: the reply is written after generation, as the message it "
     "returns) or authors (online mode, no --batch-decode: the authors' chat protocol, which writes the generation "
     "header and every generated token as they run)"),
    ("--window-tokens", "window_tokens", int, "windowed mode: tokens of recent text kept (default 1024)"),
    ("--kv-tokens", "kv_tokens", int, "online mode: KV budget per session (default: the context window)"),
    ("--kv-cache-bytes", "kv_cache_bytes", int, "bytes of hot KV caches kept in memory (default 2 GiB)"),
    ("--kv-cache-dir", "kv_cache_dir", str, "save KV caches here across restarts (default: not saved)"),
    ("--max-message-tokens", "max_message_tokens", int, "longest message accepted (default 8192; 413 beyond)"),
    ("--max-new-tokens", "max_new_tokens", int, "answer length when a request sets none (default 512)"),
    ("--max-queue", "max_queue", int, "model requests admitted at once, running + waiting (default 64; 503 beyond)"),
    ("--max-concurrency", "max_concurrency", int,
     "of those, running in the engine at once (default min(4, max-queue); with --batch-decode min(batch-max-rows, "
     "max-queue))"),
    ("--batch-max-rows", "batch_max_rows", int, "with --batch-decode: most sessions in one batched step (default 16)"),
    ("--on-divergence", "on_divergence", str,
     "reject (default: 409 history_conflict) or rollback (replay edited / regenerated histories; one client per "
     "session): what a chat request whose history diverges from the session does unless it says"),
    ("--max-messages-per-call", "max_messages_per_call", int, "most messages in one request (default 1000)"),
    ("--retry-after", "retry_after_s", int, "Retry-After seconds of a 503 (default 1)"),
    ("--max-import-bytes", "max_import_bytes", int, "largest session file accepted by import (default 64 MiB)"),
    ("--namespace", "namespace", str, "namespace of local single-user mode (default 'default')"),
    ("--log-level", "log_level", str, "critical, error, warning, info (default) or debug"),
)


def settings_from_args(args: argparse.Namespace) -> Any:
    """:class:`~deltamem_agents.server.settings.ServerSettings` from the flags given (over the environment)."""
    from .settings import ServerSettings

    given = {field: getattr(args, field) for _, field, _, _ in _SERVE_FLAGS if getattr(args, field) is not None}
    if args.threads is not None:
        given["threads"] = args.threads
    if args.require_keys:
        given["require_keys"] = True
    if args.batch_decode:
        given["batch_decode"] = True
    return ServerSettings(**given)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        print(f"error: the server needs the 'server' extra ({exc.name} is missing): "
              "pip install 'deltamem-agents[server]'", file=sys.stderr)
        return 2
    from pydantic import ValidationError

    from .serve import ServerConfigError, run_server

    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid server settings: {problems}", file=sys.stderr)
        return 2
    try:
        run_server(settings, workers=args.workers)
    except ServerConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _key_store(args: argparse.Namespace) -> Any:
    from .keys import KeyStore

    return KeyStore(args.store or os.environ.get(STORE_ENV) or None)


def _cmd_keys(args: argparse.Namespace) -> int:
    from ..store.base import InvalidIdentifierError
    from .keys import KeyNotFoundError

    try:
        with _key_store(args) as keys:
            if args.action == "create":
                key, secret = keys.create(args.namespace, args.name)
                if args.json:
                    print(json.dumps(key.as_dict() | {"key": secret}, indent=2))
                else:
                    print(secret)
                    print(f"(key {key.id} for namespace {key.namespace!r}: shown only now, store it safely)",
                          file=sys.stderr)
            elif args.action == "list":
                rows = [k.as_dict() for k in keys.list_keys(args.namespace, include_revoked=not args.active)]
                if args.json:
                    print(json.dumps(rows, indent=2))
                else:
                    for row in rows:
                        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
                        print(f"{row['id']}  namespace={row['namespace']}  name={row['name'] or '-'}  "
                              f"created={row['created_at']}  {state}")
            elif args.action == "revoke":
                key = keys.revoke(args.key_id)
                print(json.dumps(key.as_dict(), indent=2) if args.json else f"revoked {key.id} ({key.namespace})")
    except (KeyNotFoundError, InvalidIdentifierError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``keys`` to the ``deltamem`` parser."""
    from ..cli_support import HelpFormatter, thread_count

    serve = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with persistent sessions", formatter_class=HelpFormatter,
        description="Serve the engine over HTTP: /v1/chat/completions, /v1/completions, /v1/models, "
        "/v1/sessions, /health, /metrics (docs/server.md).\nEvery option can also be set as an environment "
        "variable DELTAMEM_<NAME> (e.g. DELTAMEM_PORT=8080); flags win.",
    )  # fmt: skip
    for flag, field, type_, help_ in _SERVE_FLAGS:
        serve.add_argument(flag, dest=field, type=type_, default=None, help=help_)
    serve.add_argument("--threads", type=thread_count, default=None, metavar="N",
                       help="torch CPU threads (default: $DELTAMEM_THREADS, else max(1, min(4, CPUs // 2)))")
    serve.add_argument("--workers", type=int, default=int(os.environ.get("DELTAMEM_WORKERS") or 1), metavar="N",
                       help="worker processes, each with its own engine; share a PostgreSQL store (default 1)")
    serve.add_argument("--require-keys", action="store_true",
                       help="always require an API key, even while none exists (no local single-user mode)")
    serve.add_argument("--batch-decode", action="store_true",
                       help="run the decode steps of concurrent requests as one batched forward (answers equal "
                       "one-at-a-time within float tolerance, not bitwise; pays on a GPU; $DELTAMEM_BATCH_DECODE)")
    serve.set_defaults(func=_cmd_serve)

    keys = sub.add_parser("keys", help="API keys of the server (each bound to a namespace)")
    actions = keys.add_subparsers(dest="action", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_)
        p.add_argument("--store", default=None,
                       help=f"the server's store URL (default: ${STORE_ENV}, else SQLite in the cache dir)")
        p.add_argument("--json", action="store_true", help="JSON output")
        p.set_defaults(func=_cmd_keys)
        return p

    p = add("create", "create a key (printed once; only its hash is stored)")
    p.add_argument("--namespace", required=True, help="the tenant: every request with this key works here only")
    p.add_argument("--name", default=None, help="a label for the key")
    p = add("list", "list keys (never their secrets)")
    p.add_argument("--namespace", default=None, help="only this namespace's keys")
    p.add_argument("--active", action="store_true", help="leave out revoked keys")
    p = add("revoke", "revoke a key (requests with it get 401 from then on)")
    p.add_argument("key_id")
