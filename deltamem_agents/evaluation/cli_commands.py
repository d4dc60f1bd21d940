"""``deltamem eval``: run the memory arms side by side on a task and write results.json / .md / .png.

Wired into the ``deltamem`` command by ``cli.py`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import ARM_NAMES, MEMORY_ARMS, WINDOWED_ARMS

__all__ = ["EvidenceCounts", "cmd_eval", "evidence_counts", "register", "resolve_adapter"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``deltamem``'s sub-parsers."""
    from ..cli_support import add_threads_argument
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
    add_threads_argument(p)
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


@dataclass(frozen=True)
class EvidenceCounts:
    """Where the questions' evidence lies relative to the windowed arms' text window of ``window_tokens``.

    ``suggested_window`` is a window (tokens) that would put at least half the annotated questions' evidence
    outside it (``None`` when there is none to suggest).
    """

    window_tokens: int
    outside: int
    inside: int
    unknown: int
    suggested_window: int | None = None

    @property
    def total(self) -> int:
        return self.outside + self.inside + self.unknown


def evidence_counts(task: Any, tokenizer: Any, window_tokens: int) -> EvidenceCounts:
    """Count the examples whose evidence lies outside / inside the window, by the runner's own rule (messages
    rendered with the chat template; the window holds the most recent whole messages within ``window_tokens``)."""
    from .prompts import PromptRenderer
    from .windows import EVIDENCE_OUTSIDE, EVIDENCE_UNKNOWN, evidence_position, window_start

    renderer = PromptRenderer(tokenizer)
    lengths_of: dict[int, list[int]] = {}  # loaders share one history list among its questions
    counts = {"outside": 0, "inside": 0, "unknown": 0}
    limits: list[int] = []  # evidence is outside a window W iff W < the tokens from its last message on
    for ex in task.examples:
        if not ex.evidence:
            counts[EVIDENCE_UNKNOWN] += 1
            continue
        lengths = lengths_of.get(id(ex.history))
        if lengths is None:
            lengths = lengths_of[id(ex.history)] = [len(i) for i in renderer.history_ids(ex.history)]
        position = evidence_position(ex.evidence, window_start(lengths, window_tokens))
        counts[position] += 1
        limits.append(sum(lengths[max(ex.evidence) :]))
    suggested = None
    if limits:
        half = sorted(limits, reverse=True)[(len(limits) + 1) // 2 - 1] - 1
        suggested = half if half > 0 else None
    return EvidenceCounts(window_tokens, counts[EVIDENCE_OUTSIDE], counts["inside"], counts["unknown"], suggested)


def _evidence_warning(ev: EvidenceCounts) -> str | None:
    """A warning when no question's evidence lies outside the window (the memory-vs-window comparison is moot)."""
    if ev.outside:
        return None
    if not ev.inside:
        return (f"no question has an evidence annotation, so the report cannot tell which answers needed memory "
                f"beyond the {ev.window_tokens}-token window")
    hint = f"; try --window-tokens {ev.suggested_window} or less" if ev.suggested_window else ""
    return (f"no question has its evidence outside the {ev.window_tokens}-token window: the windowed arms see "
            f"every answer as text, so δ-mem vs window measures nothing{hint}")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..cli_support import apply_threads

    apply_threads(args.threads)  # before the model loads
    import torch

    from ..models import load_base_model
    from .lm import LanguageModel
    from .report import write_report
    from .runner import EvalConfig, evaluate, parse_arms
    from .tasks import load_eval_task

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arms = parse_arms(args.arms)
    kind, adapter_path = resolve_adapter(args.adapter)
    warnings: list[str] = []

    def warn(text: str) -> None:
        warnings.append(text)
        print(f"warning: {text}", file=sys.stderr, flush=True)

    skipped: list[str] = []
    skip_reason = ""
    wants_memory = any(a in MEMORY_ARMS for a in arms)
    if wants_memory and (kind == "none" or (kind == "default" and adapter_path is None)):
        skipped = [a for a in arms if a in MEMORY_ARMS]
        arms = [a for a in arms if a not in MEMORY_ARMS]
        skip_reason = "--adapter none" if kind == "none" else "no shipped adapter is installed"
        advice = "" if kind == "none" else (
            " (--adapter default); pass --adapter DIR for a trained adapter, or --adapter untrained for a fresh one "
            "as a control"
        )
        warn(f"dropping the requested arm(s) {', '.join(skipped)}: {skip_reason}{advice}")
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
    evidence = None
    if any(a in WINDOWED_ARMS for a in arms):
        evidence = evidence_counts(task, tokenizer, args.window_tokens)
        print(f"evidence: {evidence.outside} of {evidence.total} questions have it outside the "
              f"{args.window_tokens}-token window ({evidence.inside} inside, {evidence.unknown} unannotated)",
              file=sys.stderr, flush=True)  # fmt: skip
        message = _evidence_warning(evidence)
        if message:
            warn(message)
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
        "warnings": warnings,
    }
    if evidence is not None:
        meta["evidence_outside_window"] = evidence.outside
    run = evaluate(task, lm, arms, config, meta=meta)
    out = Path(args.out or Path("eval-results") / args.task)
    command = "deltamem eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    paths = write_report(run, out, command)
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    for text in warnings:  # again, below the tables and progress bars, where they are seen
        print(f"warning: {text}", file=sys.stderr)
    return 0
