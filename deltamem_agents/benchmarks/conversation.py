"""Windowed δ-mem against full context as one conversation grows (``deltamem bench conversation``).

One synthetic conversation is grown to each checkpoint (1k … 32k tokens of history). At every checkpoint both
arms answer the same new question, measured in the same run:

* **windowed δ-mem**: the :class:`~deltamem_agents.engine.MemoryEngine` in windowed mode, in-memory store. The
  history up to the checkpoint has been written before (untimed: those were earlier turns); the timed turn
  writes the new question, prompts with the recent window + question, generates, and writes the reply.
* **full context**: the same base model with memory off, the whole history + question in the prompt, prefilled
  afresh (no prefix cache across turns, as a stateless chat endpoint does) and the same number of tokens
  generated.

Per turn we record the wall time and the peak resident memory above the level just before the turn (RSS sampled
every 2 ms from ``/proc/self/statm`` by :class:`~deltamem_agents.evaluation.resources.ResourceMonitor`: torch's
CPU allocations are invisible to tracemalloc). The ratio full ÷ windowed is what matters; these machines are shared and noisy.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..evaluation.resources import ResourceMonitor

DEFAULT_CHECKPOINTS = (1024, 2048, 4096, 8192, 16384, 32768)

_WORDS = (
    "project budget meeting client deadline report server database release schedule design review team "
    "customer invoice contract supplier warehouse shipment analysis forecast quarter revenue marketing launch "
    "campaign feedback survey prototype testing deployment migration backup security audit training workshop "
    "office travel conference agenda minutes proposal estimate milestone roadmap feature issue ticket"
).split()


def synthetic_conversation(tokenizer, total_tokens: int, seed: int = 0) -> list[dict[str, str]]:
    """Alternating user (~220 tokens) / assistant (~40 tokens) messages until ``total_tokens`` is passed."""
    rng = random.Random(seed)
    messages: list[dict[str, str]] = []
    used = 0
    turn = 0
    while used < total_tokens:
        n_words = 170 if turn % 2 == 0 else 30
        sentences = []
        while sum(len(s.split()) for s in sentences) < n_words:
            words = rng.sample(_WORDS, 9)
            sentences.append(f"The {words[0]} for the {words[1]} moved to {rng.randint(1, 28)} "
                             f"{rng.choice(['March', 'April', 'May', 'June'])} after the {words[2]} "
                             f"{words[3]} with {words[4]} {words[5]} and {words[6]}.")
        content = " ".join(sentences)
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": content})
        used += len(tokenizer(content, add_special_tokens=False).input_ids) + 5  # + template tokens
        turn += 1
    return messages


def _peak_rss(interval_s: float = 0.002) -> ResourceMonitor:
    """Peak RSS above the start of the block, sampled every 2 ms (the evaluation harness's monitor)."""
    return ResourceMonitor(interval_s=interval_s)


def _extra_mib(monitor: ResourceMonitor) -> float:
    usage = monitor.usage
    return usage.peak_rss_mib - usage.rss_start_mib


@dataclass
class TurnMeasure:
    history_tokens: int
    arm: str
    prompt_tokens: int
    latency_s: float
    peak_extra_mib: float


def _full_context_turn(engine, history, question, new_tokens: int) -> tuple[int, float, float]:
    tok = engine.tokenizer
    dm = engine.model
    text = tok.apply_chat_template(history + [question], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with _peak_rss() as mem, dm.memory_disabled(), torch.inference_mode():
        t0 = time.perf_counter()
        dm.base_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=tok.eos_token_id,
        )
        latency = time.perf_counter() - t0
    return int(ids.shape[1]), latency, _extra_mib(mem)


def run_conversation_benchmark(
    engine,
    *,
    checkpoints: tuple[int, ...] = DEFAULT_CHECKPOINTS,
    new_tokens: int = 16,
    repeats: int = 1,
    full_context_max: int | None = None,
    progress: bool = True,
) -> list[TurnMeasure]:
    """Grow one conversation through ``checkpoints`` (history tokens) and time one turn per arm at each.

    ``full_context_max``: skip the full-context arm above this many history tokens (it is the slow one).
    """
    tok = engine.tokenizer
    conversation = synthetic_conversation(tok, max(checkpoints) + 512)
    # history length after each message: content tokens + the ChatML frame (<|im_start|>role\n … <|im_end|>\n)
    lengths, used = [], 0
    for m in conversation:
        used += len(tok(m["content"], add_special_tokens=False).input_ids) + 5
        lengths.append(used)
    question = {"role": "user", "content": "Which meeting moved most recently, and to which date?"}
    session = f"bench-{int(time.time())}"
    results: list[TurnMeasure] = []
    written_upto = 0
    for target in checkpoints:
        n = next((i + 1 for i, length in enumerate(lengths) if length >= target), len(conversation))
        if n % 2 == 1:  # end on an assistant message so the question follows a reply
            n += 1
        history = conversation[:n]
        hist_tokens = lengths[n - 1]
        if n > written_upto:  # earlier turns: write the history up to here (untimed)
            engine.write(session, history, history="full")
            written_upto = n
        for _ in range(repeats):
            with _peak_rss() as mem:
                t0 = time.perf_counter()
                res = engine.chat(session, history + [question], max_new_tokens=new_tokens, history="full")
                latency = time.perf_counter() - t0
            results.append(TurnMeasure(hist_tokens, "deltamem-windowed", res.usage.prompt_tokens, latency,
                                       _extra_mib(mem)))
            engine.rollback(session, res.turn - 1)  # undo the question + reply so every checkpoint is alike
            if full_context_max is None or hist_tokens <= full_context_max:
                p, lat, peak = _full_context_turn(engine, history, question, new_tokens)
                results.append(TurnMeasure(hist_tokens, "full-context", p, lat, peak))
        if progress:
            w = [r for r in results if r.history_tokens == hist_tokens and r.arm == "deltamem-windowed"]
            f = [r for r in results if r.history_tokens == hist_tokens and r.arm == "full-context"]
            wl = statistics.median(r.latency_s for r in w)
            line = f"history {hist_tokens:>6} tok | windowed {wl:6.2f} s, +{w[-1].peak_extra_mib:6.1f} MiB"
            if f:
                fl = statistics.median(r.latency_s for r in f)
                line += f" | full {fl:6.2f} s, +{f[-1].peak_extra_mib:7.1f} MiB | full ÷ windowed {fl / wl:5.2f}"
            print(line, flush=True)
    return results


def summarize(results: list[TurnMeasure]) -> list[dict]:
    """One row per checkpoint: medians per arm and the ratios."""
    rows = []
    for h in sorted({r.history_tokens for r in results}):
        row: dict = {"history_tokens": h}
        for arm in ("deltamem-windowed", "full-context"):
            rs = [r for r in results if r.history_tokens == h and r.arm == arm]
            if rs:
                row[arm] = {
                    "prompt_tokens": rs[0].prompt_tokens,
                    "latency_s": statistics.median(r.latency_s for r in rs),
                    "peak_extra_mib": max(r.peak_extra_mib for r in rs),
                }
        if "full-context" in row:
            row["latency_ratio_full_over_windowed"] = (
                row["full-context"]["latency_s"] / row["deltamem-windowed"]["latency_s"]
            )
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| history tokens | windowed prompt | windowed latency (s) | windowed peak +MiB | full prompt | "
        "full latency (s) | full peak +MiB | full ÷ windowed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w = r["deltamem-windowed"]
        f = r.get("full-context")
        full = (f"{f['prompt_tokens']} | {f['latency_s']:.2f} | {f['peak_extra_mib']:.1f} | "
                f"{r['latency_ratio_full_over_windowed']:.2f}") if f else "– | – | – | –"
        lines.append(f"| {r['history_tokens']} | {w['prompt_tokens']} | {w['latency_s']:.2f} | "
                     f"{w['peak_extra_mib']:.1f} | {full} |")
    return "\n".join(lines)


def flatness(rows: list[dict]) -> float:
    """Windowed latency at the largest checkpoint ÷ at the smallest (1.0 = perfectly flat)."""
    first, last = rows[0]["deltamem-windowed"]["latency_s"], rows[-1]["deltamem-windowed"]["latency_s"]
    return last / first


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = [r["history_tokens"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, style in (("deltamem-windowed", "o-"), ("full-context", "s--")):
        pts = [(r["history_tokens"], r[arm]) for r in rows if arm in r]
        if not pts:
            continue
        a1.plot([p[0] for p in pts], [p[1]["latency_s"] for p in pts], style, label=arm)
        a2.plot([p[0] for p in pts], [p[1]["peak_extra_mib"] for p in pts], style, label=arm)
    for ax, title in ((a1, "per-turn latency (s)"), (a2, "peak memory above baseline (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(hs, [f"{h // 1024}k" for h in hs])
        ax.set_xlabel("conversation history (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(results: list[TurnMeasure], rows: list[dict], path: str | Path, **context) -> None:
    payload = {
        "context": {"torch": torch.__version__, "threads": torch.get_num_threads(), **context},
        "summary": rows,
        "flatness_windowed_last_over_first": flatness(rows),
        "turns": [asdict(r) for r in results],
    }
    Path(path).write_text(json.dumps(payload, indent=2))
