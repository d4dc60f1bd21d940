"""The ``deltamem`` command.

Errors: every error deltamem raises on purpose (:class:`~deltamem_agents.errors.DeltaMemError`) and an
``OSError`` from the user's environment (a read-only or full disk, a missing file) end the command with one line
on stderr, ``error: <message>``, and exit code 2 when the command line itself was wrong (a bad option value,
session id or message) or 1 otherwise — never a traceback, unless ``-v`` (``deltamem -v …``, or ``chat -v``)
or ``DELTAMEM_DEBUG=1`` asks for it (:func:`report_error`). Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .cli_support import add_threads_argument, apply_threads

__all__ = [
    "DEBUG_ENV",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "report_error",
]

#: ``DELTAMEM_DEBUG=1``: an error prints its traceback after the ``error:`` line.
DEBUG_ENV = "DELTAMEM_DEBUG"
#: Exit codes: the command line was wrong / anything else failed.
EXIT_USAGE, EXIT_ERROR = 2, 1


def _cmd_model_fetch(args: argparse.Namespace) -> int:
    from .models import fetch_embedded_model

    path = fetch_embedded_model(progress=not args.quiet)
    print(path)
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from .models import cache_dir
    from .models.embedded import embedded_model_status
    from .models.embedded_spec import ENV_MODEL_DIR

    status = embedded_model_status()
    spec, d = status.spec, status.directory
    print(f"embedded model: {spec.name} ({spec.license}), from PyPI {spec.requirement}")
    print(f"source file:    {spec.gguf_name} ({spec.size:,} bytes, sha256 {spec.sha256})")
    print(f"cache dir:      {cache_dir()}")
    if status.from_env:
        print(f"converted dir:  {d} (from ${ENV_MODEL_DIR}: {'present' if status.present else 'no model in it'})")
    elif status.present:
        print(f"converted dir:  {d} (present, converted with transformers {status.converted_with or '?'})")
    else:
        print(f"converted dir:  {d} (absent: run `deltamem model fetch`)")
    return 0


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    if args.shapes is not None or args.device != "cpu" or args.theirs is not None:
        return _cmd_bench_speed_shapes(args)
    import torch

    from .adapter import DeltaMemConfig
    from .benchmarks.speed import format_table, run_speed_benchmark, write_json
    from .models import load_base_model

    model, _ = load_base_model(args.model)
    config = DeltaMemConfig(write_mode=args.write_mode)
    print(
        f"model {getattr(model.config, '_name_or_path', '?')} | δ-mem {args.write_mode} r={config.rank} "
        f"N={config.num_states} | torch threads {torch.get_num_threads()} | {args.rounds} rounds, medians",
        flush=True,
    )
    results = run_speed_benchmark(
        model,
        config,
        prefill_lengths=tuple(args.prefill),
        decode_tokens=64 if args.decode_tokens is None else args.decode_tokens,
        rounds=args.rounds,
    )
    print()
    print(format_table(results))
    if args.json:
        write_json(results, args.json, model=str(args.model or "embedded"), write_mode=args.write_mode)
        print(f"\nwrote {args.json}")
    return 0


def _cmd_bench_speed_shapes(args: argparse.Namespace) -> int:
    """``deltamem bench speed`` on a random-weight model of named shapes, beside the authors' code (speed_gpu)."""
    import torch

    from .benchmarks import speed_gpu

    dtype = getattr(torch, args.dtype)
    shapes = args.shapes or "qwen3-4b"
    arms = tuple(args.arms) if args.arms else tuple(a for a in speed_gpu.ARMS if a != "theirs" or args.theirs)
    prompts = tuple(args.prompts) if args.prompts else ((4096, 16384, 32768) if shapes == "qwen3-4b" else (64, 130))
    decode = args.decode_tokens if args.decode_tokens is not None else (256 if shapes == "qwen3-4b" else 4)
    print(f"shapes {shapes} | {args.device} {args.dtype} | prompts {list(prompts)} + {decode} decoded | "
          f"arms {list(arms)}", flush=True)
    results = speed_gpu.run_gpu_speed_benchmark(device=args.device, dtype=dtype, shapes=shapes, prompts=prompts,
                                                decode_tokens=decode, arms=arms, theirs=args.theirs)
    print()
    print(speed_gpu.format_table(results))
    if args.json:
        speed_gpu.write_json(results, args.json, shapes=shapes, device=args.device, dtype=args.dtype,
                             theirs=str(args.theirs) if args.theirs else None)
        print(f"\nwrote {args.json}")
    return 0


def _cmd_bench_batched(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    import torch

    from .benchmarks.batched_decode import format_table, make_tiny_pair, run_batched_benchmark, write_json

    model: object = args.model
    if args.model == "tiny":
        from transformers import AutoTokenizer

        from .models import embedded_model_dir

        model = make_tiny_pair(AutoTokenizer.from_pretrained(embedded_model_dir()))
    print(f"model {args.model or 'embedded'} | torch threads {torch.get_num_threads()} | {args.new_tokens} tokens "
          f"per session | {args.rounds} rounds, medians", flush=True)
    results = run_batched_benchmark(model, sessions=tuple(args.sessions), new_tokens=args.new_tokens,
                                    rounds=args.rounds, measures=tuple(args.measures.split(",")))
    print()
    print(format_table(results))
    if args.json:
        write_json(results, args.json, model=str(args.model or "embedded"), threads=torch.get_num_threads(),
                   new_tokens=args.new_tokens)
        print(f"\nwrote {args.json}")
    return 0


def _cmd_bench_conversation(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    import torch

    from .benchmarks import conversation as bench
    from .engine import MemoryEngine
    from .store.memory import InMemorySessionStore

    engine = MemoryEngine(args.model, adapter=args.adapter, store=InMemorySessionStore(),
                          window_tokens=args.window_tokens, kv_tokens=args.kv_tokens)
    arms = tuple(args.arms.split(","))
    print(f"model {engine.model_name} | online KV budget {engine.kv_tokens} tokens | window {args.window_tokens} "
          f"tokens | {args.new_tokens} new tokens per turn | torch threads {torch.get_num_threads()}", flush=True)
    checkpoints = tuple(args.checkpoints)
    results = bench.run_conversation_benchmark(
        engine, checkpoints=checkpoints, new_tokens=args.new_tokens, repeats=args.repeats,
        full_context_max=args.full_context_max, arms=arms,
    )
    rows = bench.summarize(results, checkpoints)
    resume = (bench.run_resume_benchmark(engine, histories=tuple(args.resume), new_tokens=args.new_tokens)
              if args.resume else [])
    print()
    print(bench.format_table(rows))
    for arm in bench.ARMS:
        g = bench.growth(rows, arm)
        if g is not None:
            print(f"{arm:>17}: latency largest ÷ smallest checkpoint {g:6.2f}, last ÷ first "
                  f"{bench.last_over_first(rows, arm):6.2f}")
    for m in resume:
        print(f"resume at {m.history_tokens} tokens: from disk {m.from_disk_s:.2f} s vs re-prefill "
              f"{m.re_prefill_s:.2f} s = {m.speedup:.2f}x")
    if args.json:
        bench.write_json(results, rows, args.json, resume=resume, model=engine.model_name,
                         window_tokens=args.window_tokens, kv_tokens=engine.kv_tokens, new_tokens=args.new_tokens)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(rows, results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_bench_store(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from .benchmarks.store_latency import format_table, measure_store

    urls = args.url
    if not urls:
        urls = [f"sqlite:///{tempfile.mkdtemp(prefix='deltamem-bench-')}/sessions.db"]
        if os.environ.get("DELTAMEM_TEST_POSTGRES_URL"):
            urls.append(os.environ["DELTAMEM_TEST_POSTGRES_URL"])
    results = [measure_store(u, rounds=args.rounds) for u in urls]
    print(format_table(results))
    return 0


#: Subcommands owned by other packages: module -> the commands it registers (each module exposes
#: ``register(subparsers)``). Only the module owning the command being run is imported (the others may import
#: torch); a command not listed here, ``--help`` or a typo imports them all.
_PLUGIN_MODULES = {
    "deltamem_agents.engine.cli_commands": ("chat", "sessions"),
    "deltamem_agents.training.cli_commands": ("train",),
    "deltamem_agents.evaluation.cli_commands": ("eval",),
    "deltamem_agents.server.cli_commands": ("serve", "keys"),
}
_BUILTIN_COMMANDS = ("model", "bench", "db")


def _plugins_for(argv: Sequence[str] | None) -> list[str]:
    """The plugin modules to import for a command line (``None``: all of them)."""
    if argv is None:
        return list(_PLUGIN_MODULES)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _BUILTIN_COMMANDS:
        return []
    owners = [m for m, commands in _PLUGIN_MODULES.items() if command in commands]
    return owners or list(_PLUGIN_MODULES)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .store import upgrade_database

    applied = upgrade_database(args.url)
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``deltamem`` parser; given the command line ``argv``, only the plugins its command needs are loaded."""
    parser = argparse.ArgumentParser(
        prog="deltamem", description="δ-mem memory backend for agents",
        epilog=f"Errors print one line, 'error: <message>', and exit with {EXIT_USAGE} when the command line was "
        f"wrong, {EXIT_ERROR} otherwise; -v or {DEBUG_ENV}=1 adds the traceback.",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", dest="debug", action="store_true",
                        help=f"print the traceback of an error (as {DEBUG_ENV}=1 does)")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded default model").add_subparsers(dest="action", required=True)
    fetch = model.add_parser("fetch", help="download (from PyPI), verify and convert the embedded model once")
    fetch.add_argument("--quiet", action="store_true")
    fetch.set_defaults(func=_cmd_model_fetch)
    info = model.add_parser("info", help="where the embedded model lives")
    info.set_defaults(func=_cmd_model_info)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="action", required=True)
    speed = bench.add_parser("speed", help="δ-mem ÷ plain model: prefill and decode tokens/s, in one run")
    speed.add_argument("--model", default=None, help="HF dir, GGUF file or hub id (default: embedded model)")
    speed.add_argument("--write-mode", default="tsw", choices=("tsw", "ssw", "msw"))
    speed.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048], help="prompt lengths")
    speed.add_argument("--decode-tokens", type=int, default=None,
                       help="decoded tokens (default 64; 256 with --shapes qwen3-4b, 4 with --shapes tiny)")
    speed.add_argument("--rounds", type=int, default=5)
    gpu = speed.add_argument_group(
        "random-weight shapes beside the authors' code (benchmarks/speed_gpu.py; used when any of these is given)")
    gpu.add_argument("--device", default="cpu", help="cuda or cpu")
    gpu.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    gpu.add_argument("--shapes", default=None, choices=("qwen3-4b", "tiny"),
                     help="random-weight model of these shapes (default with --device cuda: qwen3-4b)")
    gpu.add_argument("--prompts", type=int, nargs="+", default=None,
                     help="prompt lengths (default 4096 16384 32768 for qwen3-4b)")
    gpu.add_argument("--arms", nargs="+", default=None, choices=("plain", "ours-torch", "ours-triton", "theirs"),
                     help="default: all (theirs only with --theirs)")
    gpu.add_argument("--theirs", default=None, metavar="PATH",
                     help="an uncommitted checkout of declare-lab/delta-Mem for the 'theirs' arm")
    add_threads_argument(speed)
    speed.add_argument("--json", default=None, help="also write the results as JSON here")
    speed.set_defaults(func=_cmd_bench_speed)
    conv = bench.add_parser(
        "conversation", help="windowed δ-mem vs full context as one conversation grows (latency, peak memory)"
    )
    conv.add_argument("--model", default=None, help="HF dir, GGUF file or hub id (default: embedded model)")
    conv.add_argument("--adapter", default=None, help="adapter dir, or 'none' (default: the shipped adapter)")
    conv.add_argument("--checkpoints", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    conv.add_argument("--window-tokens", type=int, default=1024, help="windowed arm: text window")
    conv.add_argument("--kv-tokens", type=int, default=None,
                      help="online arm: KV budget (default: the model's context window)")
    conv.add_argument("--arms", default="online,windowed,full-context", help="comma-separated arms to run")
    conv.add_argument("--resume", type=int, nargs="*", default=[4096, 8192],
                      help="history sizes at which to time a restart: saved KV cache vs re-prefill")
    conv.add_argument("--new-tokens", type=int, default=16, help="tokens generated per turn")
    conv.add_argument("--repeats", type=int, default=1)
    conv.add_argument("--full-context-max", type=int, default=None, help="skip full context above this")
    add_threads_argument(conv)
    conv.add_argument("--json", default=None)
    conv.add_argument("--plot", default=None, help="write a PNG plot here")
    conv.set_defaults(func=_cmd_bench_conversation)
    batched = bench.add_parser("batched", help="N concurrent sessions: batched decode ÷ one forward at a time")
    batched.add_argument("--model", default=None,
                         help="'tiny' (a 2-layer random Llama), HF dir, GGUF file or hub id (default: embedded model)")
    batched.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent sessions")
    batched.add_argument("--new-tokens", type=int, default=32, help="tokens generated per session")
    batched.add_argument("--rounds", type=int, default=3)
    batched.add_argument("--measures", default="decode,engine", help="comma-separated: decode, engine")
    add_threads_argument(batched)
    batched.add_argument("--json", default=None, help="also write the results as JSON here")
    batched.set_defaults(func=_cmd_bench_batched)
    store = bench.add_parser("store", help="store round trip (commit + load of one state): median and p99")
    store.add_argument("--url", action="append", default=None,
                       help="store URL (repeatable; default: a temporary SQLite file, plus $DELTAMEM_TEST_POSTGRES_URL)")
    store.add_argument("--rounds", type=int, default=200)
    store.set_defaults(func=_cmd_bench_store)
    from .benchmarks import server_load  # stdlib only at import; httpx when it runs

    srv = bench.add_parser("server", help="load test of a running `deltamem serve`: latency, tokens/s, consistency")
    server_load.add_arguments(srv)
    srv.set_defaults(func=server_load.run_args)

    db = sub.add_parser("db", help="the session database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply the shipped schema migrations (idempotent)")
    upgrade.add_argument("--url", default=None, help="SQLAlchemy URL (default: SQLite file in the cache dir)")
    upgrade.set_defaults(func=_cmd_db_upgrade)

    # Subcommands owned by other packages register themselves (each module exposes ``register(subparsers)``).
    for module in _plugins_for(argv):
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a part not installed in this tree
            if exc.name != module:
                raise
            continue
        plugin.register(sub)
    return parser


def _usage_error(exc: BaseException) -> bool:
    """An error in what the user typed: a bad option value, session id, namespace, store URL or message."""
    from .engine.errors import InvalidMessageError, InvalidOptionError
    from .store.errors import InvalidIdentifierError, InvalidStoreURLError

    return isinstance(exc, InvalidOptionError | InvalidMessageError | InvalidIdentifierError | InvalidStoreURLError)


def report_error(exc: BaseException, *, debug: bool = False) -> int:
    """Print ``error: <message>`` (one line) to stderr — and the traceback with ``debug`` or ``DELTAMEM_DEBUG=1``
    — and return the exit code: :data:`EXIT_USAGE` for an error in the command line, else :data:`EXIT_ERROR`."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE if _usage_error(exc) else EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code (see the module docstring)."""
    from .errors import DeltaMemError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    debug = bool(getattr(args, "debug", False) or getattr(args, "verbose", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:  # the reader went away (`deltamem sessions list | head`): nothing left to say
        return EXIT_ERROR
    except (DeltaMemError, OSError) as exc:
        return report_error(exc, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
