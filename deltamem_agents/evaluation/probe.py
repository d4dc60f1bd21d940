"""Quick measurements of what a trained adapter's state holds (used for the training report).

This is not the evaluation suite (``deltamem_agents.evaluation`` compares every arm on every task); it answers the
trainer's own questions on synthetic held-out dialogues:

* **state-only 4-way choice** by likelihood: the history is written into the state, then only
  ``[system, question]`` is in the prompt (writes off) and the choice with the highest summed log-probability wins;
  against the plain model without history (``none``) and with the history in its prompt (``context``);
* **state-only generation exact match** (greedy, writes off), scored with the evaluation suite's own
  ``exact_match`` / ``contains_match`` (``metrics.py`` beside it), so "exact match" means one thing everywhere;
* **general ability**: perplexity of reference answers to short questions with no history, plain vs δ-mem with a
  fresh state (must be identical) vs δ-mem after a long unrelated conversation was written into the state.

Run: ``python -m deltamem_agents.evaluation.probe --adapter DIR [--n 200] [--gen 60] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..adapter import DeltaMemModel
from ..extras import pyplot
from ..training.collate import encode_context, encode_prompt_answer, pad_read, pad_write
from ..training.config import DEFAULT_SYSTEM_PROMPT
from ..training.data.general import GENERAL_QA, long_conversation
from ..training.examples import MemoryExample
from .metrics import contains_match, exact_match, wilson_interval

__all__ = [
    "MODES",
    "choice_accuracy",
    "general_ability",
    "generate_answers",
    "main",
    "plot_recall_curve",
    "probe_memory",
    "recall_curve",
    "score_rows",
    "summarize",
    "write_histories",
]

MODES = ("state", "none", "context")



def _groups(examples: Sequence[MemoryExample]) -> list[list[MemoryExample]]:
    out: list[list[MemoryExample]] = []
    for ex in examples:
        key = ex.meta.get("group", ex.id)
        if out and out[-1][0].meta.get("group", out[-1][0].id) == key:
            out[-1].append(ex)
        else:
            out.append([ex])
    return out


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


@torch.no_grad()
def write_histories(dm: DeltaMemModel, tokenizer: Any, histories: list[list[dict[str, str]]],
                    system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_tokens: int = 8192) -> None:
    """Reset the state to ``len(histories)`` rows and write ``[system] + history`` of each (right-padded)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    sentinel = encode_prompt_answer(tokenizer, [{"role": "user", "content": "x"}], None)[0][0]
    rows = []
    for h in histories:
        ids, seg = encode_context(tokenizer, system + h, max_tokens - 1)
        rows.append((ids + [sentinel], seg + [seg[-1] + 1]))  # sentinel closes the last message under SSW
    batch = pad_write(rows, _pad_id(tokenizer), dm.new_state(1).device)
    dm.reset_state(len(rows))
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              use_cache=False, logits_to_keep=1)
    if dm.config.write_mode == "ssw":
        kw["segment_ids"] = batch.segment_ids
    dm(**kw)


@torch.no_grad()
def score_rows(dm: DeltaMemModel, tokenizer: Any, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
    """Summed log-probability and token count of each row's answer part (no writes; uses the current state)."""
    batch = pad_read(rows, _pad_id(tokenizer), dm.new_state(1).device)
    with dm.writes_disabled():
        logits = dm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False, logits_to_keep=batch.keep).logits
    K = logits.shape[1]
    targets = batch.labels[:, -K:][:, 1:]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    valid = targets != -100
    tok = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * valid
    return [(float(tok[i].sum()), int(valid[i].sum())) for i in range(len(rows))]


def _prompt(ex: MemoryExample, mode: str, system_prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = ex.history if mode == "context" else []
    return system + history + [{"role": "user", "content": ex.question}]


@torch.no_grad()
def choice_accuracy(dm: DeltaMemModel, tokenizer: Any, examples: Sequence[MemoryExample], mode: str = "state",
                    system_prompt: str = DEFAULT_SYSTEM_PROMPT, groups_per_batch: int = 4) -> list[bool]:
    """Per example: does the correct choice get the highest summed log-probability?"""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    results: list[bool] = []
    groups = _groups(examples)
    for i in range(0, len(groups), groups_per_batch):
        chunk = groups[i : i + groups_per_batch]
        rows, owners, spans = [], [], []
        for gi, g in enumerate(chunk):
            for ex in g:
                start = len(rows)
                for choice in ex.choices or []:
                    rows.append(encode_prompt_answer(tokenizer, _prompt(ex, mode, system_prompt), choice))
                    owners.append(gi)
                spans.append((ex, start, len(rows)))
        if mode == "state":
            write_histories(dm, tokenizer, [g[0].history for g in chunk], system_prompt)
            dm.set_state(dm.get_state(owners))
            scores = score_rows(dm, tokenizer, rows)
        else:
            with dm.memory_disabled():
                scores = score_rows(dm, tokenizer, rows)
        for ex, a, b in spans:
            best = max(range(a, b), key=lambda j: scores[j][0])
            results.append(ex.choices[best - a] == ex.answer)
    return results


@torch.no_grad()
def generate_answers(dm: DeltaMemModel, tokenizer: Any, examples: Sequence[MemoryExample], mode: str = "state",
                     system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_new_tokens: int = 16,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers; ``state`` mode writes the history into the state and generates with writes off."""
    out: list[str] = []
    device = dm.new_state(1).device
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        rows = [(encode_prompt_answer(tokenizer, _prompt(ex, mode, system_prompt), None)[0], []) for ex in chunk]
        T = max(len(p) for p, _ in rows)
        ids = torch.full((len(rows), T), _pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, (p, _) in enumerate(rows):
            ids[b, T - len(p) :] = torch.tensor(p)
            mask[b, T - len(p) :] = 1
        kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                  do_sample=False, pad_token_id=_pad_id(tokenizer))
        if mode == "state":
            write_histories(dm, tokenizer, [ex.history for ex in chunk], system_prompt)
            with dm.writes_disabled():
                gen = dm.generate(**kw)
        else:
            with dm.memory_disabled():
                gen = dm.generate(**kw)
        for b in range(len(rows)):
            out.append(tokenizer.decode(gen[b, T:], skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def general_ability(dm: DeltaMemModel, tokenizer: Any, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                    qa: Sequence[tuple[str, str]] = GENERAL_QA) -> dict[str, Any]:
    """Perplexity of reference answers to short questions (no history) under four conditions.

    ``plain``: memory disabled. ``fresh_state_read``: δ-mem on, zero state, writes off (must equal plain).
    ``fresh_state_online``: zero state, the question written as it passes (the adapter's own effect).
    ``after_long_conversation``: writes off, reading a state into which ~40 unrelated turns were written.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rows = [encode_prompt_answer(tokenizer, system + [{"role": "user", "content": q}], a) for q, a in qa]

    def ppl(scores: list[tuple[float, int]]) -> float:
        return math.exp(-sum(s for s, _ in scores) / sum(n for _, n in scores))

    with dm.memory_disabled():
        plain = ppl(score_rows(dm, tokenizer, rows))
    dm.reset_state(len(rows))
    fresh = ppl(score_rows(dm, tokenizer, rows))
    online = []
    for r in rows:  # writes on, one row at a time (a fresh state each)
        batch = pad_read([r], _pad_id(tokenizer), dm.new_state(1).device)
        dm.reset_state(1)
        logits = dm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False, logits_to_keep=batch.keep).logits
        K = logits.shape[1]
        t = batch.labels[:, -K:][:, 1:]
        lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, t.clamp_min(0)[..., None])[..., 0] * (t != -100)
        online.append((float(lp.sum()), int((t != -100).sum())))
    conv = long_conversation()
    write_histories(dm, tokenizer, [conv], system_prompt)
    n_conv_tokens = len(encode_context(tokenizer, system + conv, 8192)[0])
    dm.set_state(dm.get_state([0] * len(rows)))
    after = ppl(score_rows(dm, tokenizer, rows))
    dm.reset_state(1)
    return {
        "n_questions": len(rows), "plain": plain, "fresh_state_read": fresh,
        "fresh_state_online": ppl(online), "after_long_conversation": after,
        "long_conversation_tokens": n_conv_tokens,
        "change_after_long_conversation_pct": 100 * (after / plain - 1),
        "change_fresh_online_pct": 100 * (ppl(online) / plain - 1),
    }


def summarize(flags: Sequence[bool]) -> dict[str, Any]:
    k, n = int(sum(flags)), len(flags)
    lo, hi = wilson_interval(k, n) if n else (0.0, 1.0)
    return {"correct": k, "n": n, "acc": k / n if n else float("nan"), "ci95": [lo, hi]}


def probe_memory(dm: DeltaMemModel, tokenizer: Any, *, n: int = 200, n_gen: int = 60, seed: int = 1234,
                 modes: Sequence[str] = MODES, level: int | None = None,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict[str, Any]:
    """State-only choice accuracy (and the no-memory / in-context arms) and generation EM on held-out
    synthetic dialogues (values never produced by the train split)."""
    from ..training.data import load_task

    examples = load_task("synthetic", split="heldout", limit=n, seed=seed, level=level)
    report: dict[str, Any] = {"n_examples": len(examples), "seed": seed, "level": level, "choice": {}}
    for mode in modes:
        t = time.perf_counter()
        flags = choice_accuracy(dm, tokenizer, examples, mode, system_prompt)
        report["choice"][mode] = {**summarize(flags), "seconds": round(time.perf_counter() - t, 1)}
        if mode == "state":
            by_level: dict[str, list[bool]] = {}
            for ex, f in zip(examples, flags, strict=True):
                by_level.setdefault(str(ex.meta.get("level")), []).append(f)
            report["choice"]["state_by_level"] = {k: summarize(v) for k, v in sorted(by_level.items())}
    if n_gen:
        sub = examples[:n_gen]
        preds = generate_answers(dm, tokenizer, sub, "state", system_prompt)
        em = [exact_match(p, ex.answers) for p, ex in zip(preds, sub, strict=True)]
        cont = [contains_match(p, ex.answers) for p, ex in zip(preds, sub, strict=True)]
        report["generation_state"] = {"exact_match": summarize(em), "contains": summarize(cont),
                                      "samples": [{"q": ex.question, "gold": ex.answer, "pred": p}
                                                  for ex, p in list(zip(sub, preds, strict=True))[:8]]}
    return report


def recall_curve(run_dir: str | Path, *, n: int = 120, seed: int = 1234, cache: str | Path | None = None,
                 model: Any = None, tokenizer: Any = None) -> list[dict[str, Any]]:
    """State-only choice accuracy on held-out dialogues for every checkpoint of a run (cached in ``cache``).

    Returns points ``{"step", "questions_seen", "contexts_seen", "acc", "ci95", "n"}`` sorted by step.
    """
    from ..adapter import load_adapter, read_adapter_metadata
    from ..models import load_base_model

    run_dir = Path(run_dir)
    cache = Path(cache) if cache else run_dir / "recall_curve.json"
    points = {p["checkpoint"]: p for p in (json.loads(cache.read_text()) if cache.is_file() else [])}
    if model is None:
        model, tokenizer = load_base_model()
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        if ckpt.name in points or not (ckpt / "trainer_state.json").is_file():
            continue
        dm = load_adapter(model, ckpt)
        rep = probe_memory(dm, tokenizer, n=n, n_gen=0, seed=seed, modes=("state",))
        dm.detach_adapter()
        tr = read_adapter_metadata(ckpt)["training"]
        points[ckpt.name] = {"checkpoint": ckpt.name, "step": tr["step"], "questions_seen": tr["questions_seen"],
                             "contexts_seen": tr["contexts_seen"], **rep["choice"]["state"]}
        cache.write_text(json.dumps(sorted(points.values(), key=lambda p: p["step"]), indent=2))
    return sorted(points.values(), key=lambda p: p["step"])


def plot_recall_curve(points: Sequence[dict[str, Any]], png: str | Path, *, chance: float = 0.25,
                      reference: dict[str, float] | None = None, title: str = "") -> None:
    """Held-out state-only choice accuracy (with 95 % Wilson bands) against training questions seen."""
    plt = pyplot("train", "the recall-curve plot")

    x = [p["questions_seen"] for p in points]
    y = [p["acc"] for p in points]
    lo = [p["ci95"][0] for p in points]
    hi = [p["ci95"][1] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x, lo, hi, alpha=0.25, label="95 % Wilson interval")
    ax.plot(x, y, marker="o", label="δ-mem, state only (held-out values)")
    ax.axhline(chance, color="grey", ls="--", label=f"chance ({chance:.2f})")
    colours = ("tab:red", "tab:green", "tab:purple", "tab:brown")
    for (name, val), colour in zip((reference or {}).items(), colours, strict=False):
        ax.axhline(val, ls=":", color=colour, label=name)
    ax.set_xlabel("training questions seen")
    ax.set_ylabel("4-way choice accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Held-out recall vs training examples")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from ..adapter import load_adapter
    from ..models import load_base_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default=None, help="adapter directory (or a checkpoint directory)")
    ap.add_argument("--run", default=None, help="a run directory: probe every checkpoint (recall curve)")
    ap.add_argument("--plot", default=None, help="with --run: write the recall curve PNG here")
    ap.add_argument("--n", type=int, default=200, help="held-out questions for the choice probe")
    ap.add_argument("--gen", type=int, default=60, help="questions for generation exact match (0: skip)")
    ap.add_argument("--modes", default="state,none,context")
    ap.add_argument("--level", type=int, default=None, help="curriculum level of the probe (default: mixed)")
    ap.add_argument("--general", action="store_true", help="also measure general ability (perplexity)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        points = recall_curve(args.run, n=args.n)
        print(json.dumps(points, indent=2))
        if args.plot:
            plot_recall_curve(points, args.plot)
        return 0
    if not args.adapter:
        ap.error("--adapter or --run is required")
    model, tokenizer = load_base_model()
    dm = load_adapter(model, args.adapter)
    report = probe_memory(dm, tokenizer, n=args.n, n_gen=args.gen, modes=args.modes.split(","), level=args.level)
    report["adapter"] = str(args.adapter)
    if args.general:
        report["general"] = general_ability(dm, tokenizer)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
