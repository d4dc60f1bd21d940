"""Summaries, tables and plots of an :class:`~deltamem_agents.evaluation.runner.EvalRun`.

``write_report(run, out_dir)`` writes ``results.json`` (configuration, summaries, costs and every answer),
``results.md`` (the tables) and ``results.png`` (score per arm with its confidence interval, one panel per
evidence split).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..extras import pyplot
from .metrics import mean_ci
from .runner import ArmCost, EvalConfig, EvalRun, Record
from .windows import EVIDENCE_INSIDE, EVIDENCE_OUTSIDE, EVIDENCE_UNKNOWN

__all__ = ["SPLITS", "format_markdown", "load_run", "summarize", "write_report"]

#: Report order: the memory test first.
SPLITS = (EVIDENCE_OUTSIDE, EVIDENCE_INSIDE, EVIDENCE_UNKNOWN, "all")
_SPLIT_TITLES = {
    EVIDENCE_OUTSIDE: "Evidence outside the window (the memory test)",
    EVIDENCE_INSIDE: "Evidence inside the window (the window text can answer)",
    EVIDENCE_UNKNOWN: "No evidence annotation",
    "all": "All examples",
}


def _cell(records: list[Record], kind: str, confidence: float, seed: int) -> dict[str, Any]:
    scores = [r.score for r in records]
    n = len(scores)
    lo, hi = mean_ci(scores, kind, confidence, seed) if n else (math.nan, math.nan)
    return {
        "n": n,
        "score": sum(scores) / n if n else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "prompt_tokens": sum(r.prompt_tokens for r in records) / n if n else math.nan,
    }


def summarize(run: EvalRun) -> dict[str, Any]:
    """Per split (and per category where examples have one): per arm n, mean score, CI, prompt tokens."""
    cfg = run.config
    by: dict[tuple[str, str], list[Record]] = defaultdict(list)
    by_cat: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in run.records:
        by[(r.evidence, r.arm)].append(r)
        by[("all", r.arm)].append(r)
        if r.category is not None:
            for split in (r.evidence, "all"):
                by_cat[(split, r.category, r.arm)].append(r)
    splits = {}
    for split in SPLITS:
        rows = {arm: _cell(by[(split, arm)], run.score_kind, cfg.confidence, cfg.seed) for arm in run.arms}
        if any(c["n"] for c in rows.values()):
            splits[split] = rows
    categories: dict[str, dict[str, dict[str, Any]]] = {}
    for (split, cat, arm), recs in sorted(by_cat.items()):
        categories.setdefault(split, {}).setdefault(cat, {})[arm] = _cell(
            recs, run.score_kind, cfg.confidence, cfg.seed
        )
    return {"splits": splits, "categories": categories}


def _fmt(x: float, pct: bool) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _metric_text(run: EvalRun) -> str:
    n, n_choice = run.meta.get("examples", 0), run.meta.get("choice_examples")
    if n_choice is None:  # results written before the count was recorded: count one arm's choice answers
        first = [r for r in run.records if r.arm == run.arms[0]]
        n_choice = sum("choice_scores" in r.extra for r in first)
    per = "mean log-prob per token" if run.config.choice_score == "mean" else "total log-prob"
    names = {"match": "exact / whole-word contains match", "label": "label match", "locomo": "LoCoMo token F1"}
    generated = f"{names.get(run.metric, run.metric)} of greedy answers"
    if n and n_choice == n:
        return f"choice likelihood ({per})"
    if n_choice:
        return f"{generated}; {n_choice} multiple-choice examples by choice likelihood ({per})"
    return generated


def format_markdown(run: EvalRun, summary: dict[str, Any], command: str | None = None) -> str:
    """The ``results.md`` text."""
    cfg = run.config
    accuracy = run.score_kind == "accuracy"
    unit = "accuracy %" if accuracy else "F1 %"
    ci_name = "Wilson" if accuracy else "bootstrap (2,000 resamples)"
    lines = [f"# Evaluation: `{run.task}`", ""]
    if command:
        lines += ["```", command, "```", ""]
    meta = run.meta
    lines += [
        f"- model: {meta.get('model', '?')}; adapter: {meta.get('adapter', 'none')}",
        f"- examples: {meta.get('examples')} questions over {meta.get('histories')} histories; "
        f"window W = {cfg.window_tokens} tokens; context limit {meta.get('context_tokens', '?')} tokens; "
        f"max new tokens {cfg.max_new_tokens}",
        f"- metric: {_metric_text(run)} ({unit}; {int(cfg.confidence * 100)} % CI: {ci_name})",
    ]
    if meta.get("skipped_arms"):
        lines.append(f"- skipped arms: {', '.join(meta['skipped_arms'])} ({meta.get('skip_reason', '')})")
    lines += [f"- **warning**: {w}" for w in meta.get("warnings", [])]
    lines.append("")
    header = f"| arm | {unit} | 95% CI | n | prompt tokens / answer |"
    for split, rows in summary["splits"].items():
        lines += [f"## {_SPLIT_TITLES[split]}", "", header, "|---|---:|---|---:|---:|"]
        for arm in run.arms:
            c = rows[arm]
            ci = f"[{_fmt(c['ci_low'], True)}, {_fmt(c['ci_high'], True)}]"
            tokens = "–" if math.isnan(c["prompt_tokens"]) else f"{c['prompt_tokens']:.0f}"
            lines.append(f"| {arm} | {_fmt(c['score'], True)} | {ci} | {c['n']} | {tokens} |")
        lines.append("")
    if summary["categories"]:
        for split in (EVIDENCE_OUTSIDE, "all"):
            cats = summary["categories"].get(split)
            if not cats:
                continue
            lines += [
                f"## Per category — {_SPLIT_TITLES[split].split(' (')[0].lower()} ({unit}, n)",
                "",
                "| category | " + " | ".join(run.arms) + " |",
                "|---|" + "---:|" * len(run.arms),
            ]
            for cat, arms in cats.items():
                cells = [
                    f"{_fmt(arms[a]['score'], True)} ({arms[a]['n']})" if a in arms else "–" for a in run.arms
                ]
                lines.append(f"| {cat} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "## Cost per arm",
        "",
        "| arm | answers | prompt tokens / answer | tokens run / answer | wall s | s / answer | peak RSS MiB |"
        + (" peak CUDA MiB |" if any(c.peak_cuda_mib is not None for c in run.costs) else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if any(c.peak_cuda_mib is not None for c in run.costs) else ""),
    ]
    for c in run.costs:
        row = (
            f"| {c.arm} | {c.answers} | {c.prompt_tokens_per_answer:.0f} | {c.processed_tokens_per_answer:.0f} | "
            f"{c.wall_s:.1f} | {c.wall_s / max(1, c.answers):.2f} | {c.peak_rss_mib:.0f} |"
        )
        if c.peak_cuda_mib is not None:
            row += f" {c.peak_cuda_mib:.0f} |"
        lines.append(row)
    method = run.costs[0].memory_method if run.costs else ""
    lines += [
        "",
        "Prompt tokens: text tokens in the prompt of each answer (cached prefix + question). Tokens run: every "
        "token the model processed for the arm divided by its answers (prefixes once per history, δ-mem write "
        f"passes, questions, generated tokens). Peak RSS: {method}, while the arm ran (the whole process, "
        "model weights included).",
        "",
    ]
    return "\n".join(lines)


def plot(run: EvalRun, summary: dict[str, Any], path: Path) -> Path:
    """Bar chart: score per arm with CI bars, one group of bars per evidence split."""
    plt = pyplot("eval", "the evaluation report's plot")

    splits = list(summary["splits"])
    arms = run.arms
    width = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(min(12.0, 3.0 + 1.4 * len(arms)), 4.5))
    for j, split in enumerate(splits):
        rows = summary["splits"][split]
        xs = [i + (j - (len(splits) - 1) / 2) * width for i in range(len(arms))]
        ys = [100 * rows[a]["score"] for a in arms]
        lo = [max(0.0, 100 * (rows[a]["score"] - rows[a]["ci_low"])) for a in arms]
        hi = [max(0.0, 100 * (rows[a]["ci_high"] - rows[a]["score"])) for a in arms]
        n = max(rows[a]["n"] for a in arms)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{split} (n={n})")
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=15)
    ax.set_ylabel("accuracy %" if run.score_kind == "accuracy" else "F1 %")
    ax.set_title(f"{run.task}: W = {run.config.window_tokens} tokens, {int(run.config.confidence * 100)}% CI")
    ax.set_ylim(0, 100)
    ax.legend(title="evidence vs window", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def write_report(run: EvalRun, out_dir: str | Path, command: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(run)
    data = run.to_dict()
    data["summary"] = summary
    if command:
        data["command"] = command
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps(_jsonable(data), indent=1, ensure_ascii=False))
    paths["md"].write_text(format_markdown(run, summary, command))
    plot(run, summary, paths["png"])
    return paths


def load_run(path: str | Path) -> tuple[EvalRun, str | None]:
    """Read a ``results.json`` back into an :class:`EvalRun` (and its command), e.g. to re-render the report."""
    data = json.loads(Path(path).read_text())
    run = EvalRun(
        task=data["task"], metric=data["metric"], score_kind=data["score_kind"], config=EvalConfig(**data["config"]),
        arms=data["arms"], records=[Record(**r) for r in data["records"]], costs=[ArmCost(**c) for c in data["costs"]],
        meta=data.get("meta", {}),
    )  # fmt: skip
    return run, data.get("command")
