"""``deltamem eval``: run the memory arms side by side on a task and write results.json / .md / .png.

Wired into the ``deltamem`` command by ``cli.py`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from .runner import ARM_NAMES, MEMORY_ARMS

__all__ = ["cmd_eval", "register", "resolve_adapter"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``deltamem``'s sub-parsers."""
    from .tasks import TASK_NAMES

    p = subparsers.add_parser(
        "eval",
        help="compare memory arms (none, window, full, bm25, deltamem, deltamem-online) on a task",
        description="Run the arms on the same examples with the same model and token budget; write "
        "results.json, results.md and results.png to --out.",
    )
    p.add_argument("task", choices=TASK_NAMES, help="task to evaluate")
    p.add_argument("--data", default=None, help="data file or directory (required for conversation and locomo)")
    p.add_argument("--arms", default=",".join(ARM_NAMES), help="comma-separated arms (default: all)")
    p.add_argument("--window-tokens", type=int, default=1024, help="text budget W of the windowed arms")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions")
    p.add_argument("--out", default=None, help="output directory (default: eval-results/<task>)")
    p.add_argument(
        "--adapter", default="default",
        help="δ-mem adapter: a directory, 'default' (the shipped adapter), 'none' (no memory arms) or "
        "'untrained' (a freshly initialised adapter: a control)",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="HF dir, GGUF file or hub id (default: embedded model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--context-tokens", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--bm25-k", type=int, default=None, help="at most k retrieved messages (default: fill W)")
    p.add_argument("--choice-score", choices=("mean", "sum"), default="mean")
    p.add_argument("--write-chunk-tokens", type=int, default=2048, help="tokens per δ-mem write call (0: one call per message, as the windowed engine writes)")
    p.add_argument("--split", default=None, help="split for the training-data tasks (synthetic: heldout)")
    p.add_argument("--subtask", type=int, default=None, help="bAbI task number for 'babi'")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
    return p


def resolve_adapter(spec: str) -> tuple[str, Path | None]:
    """``(kind, path)`` for ``--adapter``: kind is ``path``, ``default``, ``none`` or ``untrained``.

    ``default`` resolves to the shipped adapter; its path is ``None`` when the package ships none yet.
    """
    from ..adapter.shipped import shipped_adapter_dir

    if spec in ("none", "untrained"):
        return spec, None
    if spec == "default":
        return "default", shipped_adapter_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    return "path", path


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..models import load_base_model
    from .lm import LanguageModel
    from .report import write_report
    from .runner import EvalConfig, evaluate, parse_arms
    from .tasks import load_eval_task

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = parse_arms(args.arms)
    kind, adapter_path = resolve_adapter(args.adapter)
    skipped: list[str] = []
    skip_reason = ""
    wants_memory = any(a in MEMORY_ARMS for a in arms)
    if wants_memory and (kind == "none" or (kind == "default" and adapter_path is None)):
        skipped = [a for a in arms if a in MEMORY_ARMS]
        arms = [a for a in arms if a not in MEMORY_ARMS]
        skip_reason = "--adapter none" if kind == "none" else "no shipped adapter is installed"
        print(f"note: skipping {', '.join(skipped)}: {skip_reason}", file=sys.stderr)
        if not arms:
            print("error: no arm left to run", file=sys.stderr)
            return 2

    task = load_eval_task(
        args.task, args.data, split=args.split, limit=args.limit, seed=args.seed, subtask=args.subtask
    )
    model, tokenizer = load_base_model(args.model, device=args.device)
    memory = None
    adapter_desc = "none"
    if any(a in MEMORY_ARMS for a in arms):
        if kind == "untrained":
            from ..adapter import attach

            memory = attach(model)
            adapter_desc = "untrained (fresh initialisation)"
        else:
            from ..adapter import adapter_fingerprint, load_adapter

            memory = load_adapter(model, adapter_path)
            adapter_desc = f"{adapter_path} (fingerprint {adapter_fingerprint(memory)[:12]})"
        memory.eval()
    lm = LanguageModel(model, tokenizer, memory)
    config = EvalConfig(
        window_tokens=args.window_tokens, max_new_tokens=args.max_new_tokens, context_tokens=args.context_tokens,
        bm25_k=args.bm25_k, choice_score=args.choice_score, write_chunk_tokens=args.write_chunk_tokens,
        seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    meta = {
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "adapter": adapter_desc,
        "device": str(lm.device),
        "torch_threads": torch.get_num_threads(),
        "context_tokens": args.context_tokens or lm.context_tokens,
        "data": args.data,
        "skipped_arms": skipped,
        "skip_reason": skip_reason,
    }
    run = evaluate(task, lm, arms, config, meta=meta)
    out = Path(args.out or Path("eval-results") / args.task)
    command = "deltamem eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    paths = write_report(run, out, command)
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
