"""The cost of a turn as one conversation grows (``deltamem bench conversation``), measured in one run.

Three arms on the same synthetic conversation (user messages of ~220 tokens), same model, same process:

* **online** (the engine's default): the conversation is driven turn by turn from the first message, as a user
  would (``history="append"``: the model's own replies become the assistant messages). Every turn is timed;
  the KV cache stays hot between turns, and when the KV budget fills the turn that slides it (older messages
  out, the rest re-prefilled once) is timed as well — those turns are their own series, and the *amortised*
  figure at a checkpoint is the mean over every turn in its bucket, slides included.
* **windowed**: the engine in ``windowed`` mode. The history up to a checkpoint is written untimed (earlier
  turns), then one turn is timed (write the question, prompt with the recent window, generate, write the reply)
  and rolled back, so every checkpoint times the same kind of turn.
* **full context without a cache**: memory off, the whole history + question in the prompt, prefilled afresh
  (a stateless chat endpoint), the same number of tokens generated.

Every turn generates exactly ``new_tokens`` tokens where it can (greedy, no repetition penalty: a uniform cost
per turn). Per turn we record the wall time and the peak resident memory above its level just before the turn
(RSS sampled every 2 ms from ``/proc/self/statm``; torch's CPU allocations are invisible to tracemalloc). The
ratios within one run are what matter: these machines are shared and noisy.

:func:`run_resume_benchmark` measures the other half of the short-term memory: a session resumed by a fresh
engine (a restart) whose KV cache was saved on disk, against the same turn re-prefilled from text.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..extras import pyplot
from ..resources import ResourceMonitor

__all__ = [
    "ARMS",
    "DEFAULT_CHECKPOINTS",
    "ResumeMeasure",
    "TurnMeasure",
    "format_table",
    "growth",
    "last_over_first",
    "plot",
    "run_conversation_benchmark",
    "run_online_arm",
    "run_resume_benchmark",
    "summarize",
    "synthetic_conversation",
    "write_json",
]

DEFAULT_CHECKPOINTS = (1024, 2048, 4096, 8192, 16384, 32768)
ARMS = ("online", "online-amortised", "windowed", "full-context")

_WORDS = (
    "project budget meeting client deadline report server database release schedule design review team "
    "customer invoice contract supplier warehouse shipment analysis forecast quarter revenue marketing launch "
    "campaign feedback survey prototype testing deployment migration backup security audit training workshop "
    "office travel conference agenda minutes proposal estimate milestone roadmap feature issue ticket"
).split()

_QUESTION = {"role": "user", "content": "Which meeting moved most recently, and to which date?"}


def _sentence(rng: random.Random) -> str:
    w = rng.sample(_WORDS, 9)
    return (f"The {w[0]} for the {w[1]} moved to {rng.randint(1, 28)} {rng.choice(['March', 'April', 'May', 'June'])}"
            f" after the {w[2]} {w[3]} with {w[4]} {w[5]} and {w[6]}.")


def _content(rng: random.Random, n_words: int) -> str:
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(_sentence(rng))
    return " ".join(sentences)


def synthetic_conversation(tokenizer, total_tokens: int, seed: int = 0) -> list[dict[str, str]]:
    """Alternating user (~220 tokens) / assistant (~40 tokens) messages until ``total_tokens`` is passed."""
    rng = random.Random(seed)
    messages: list[dict[str, str]] = []
    used = 0
    turn = 0
    while used < total_tokens:
        content = _content(rng, 170 if turn % 2 == 0 else 30)
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
    """One timed turn. ``history_tokens``: tokens of conversation before it; ``kv_cache``: online only."""

    history_tokens: int
    arm: str
    prompt_tokens: int
    latency_s: float
    peak_extra_mib: float
    completion_tokens: int = 0
    cached_tokens: int = 0
    kv_cache: str | None = None
    checkpoint: int | None = None  # windowed / full context: the checkpoint this turn was timed for

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


_GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}


def _timed_chat(engine, session: str, messages, **kwargs):
    with _peak_rss() as mem:
        t0 = time.perf_counter()
        res = engine.chat(session, messages, **_GREEDY, **kwargs)
        latency = time.perf_counter() - t0
    return res, latency, _extra_mib(mem)


def run_online_arm(engine, *, max_history: int, new_tokens: int, session: str, progress: bool = True,
                   seed: int = 0) -> list[TurnMeasure]:
    """Drive one online conversation from nothing to ``max_history`` tokens, timing every turn."""
    rng = random.Random(seed)
    results: list[TurnMeasure] = []
    history = 0
    next_report = 1024
    while history < max_history:
        message = {"role": "user", "content": _content(rng, 170)}
        res, latency, peak = _timed_chat(engine, session, [message], mode="online", history="append",
                                         max_new_tokens=new_tokens)
        results.append(TurnMeasure(history, "online", res.usage.prompt_tokens, latency, peak,
                                   res.usage.completion_tokens, res.usage.cached_tokens, res.kv_cache))
        history += res.usage.written_tokens
        if progress and history >= next_report:
            print(f"online   history {history:>6} tok | last turn {latency:6.2f} s ({res.kv_cache}, prompt "
                  f"{res.usage.prompt_tokens}, cached {res.usage.cached_tokens})", flush=True)
            next_report *= 2
    return results


def run_conversation_benchmark(
    engine,
    *,
    checkpoints: tuple[int, ...] = DEFAULT_CHECKPOINTS,
    new_tokens: int = 16,
    repeats: int = 1,
    full_context_max: int | None = None,
    arms: tuple[str, ...] = ("online", "windowed", "full-context"),
    progress: bool = True,
) -> list[TurnMeasure]:
    """Time the arms along one growing conversation (see the module docstring).

    ``full_context_max``: skip the full-context arm above this many history tokens (it is the slow one).
    """
    tag = f"bench-{int(time.time())}"
    results: list[TurnMeasure] = []
    if "online" in arms:
        results += run_online_arm(engine, max_history=max(checkpoints), new_tokens=new_tokens,
                                  session=f"{tag}-online", progress=progress)
    if not {"windowed", "full-context"} & set(arms):
        return results
    tok = engine.tokenizer
    conversation = synthetic_conversation(tok, max(checkpoints) + 512)
    # history length after each message: content tokens + the ChatML frame (<|im_start|>role\n … <|im_end|>\n)
    lengths, used = [], 0
    for m in conversation:
        used += len(tok(m["content"], add_special_tokens=False).input_ids) + 5
        lengths.append(used)
    session = f"{tag}-windowed"
    written_upto = 0
    for target in checkpoints:
        n = next((i + 1 for i, length in enumerate(lengths) if length >= target), len(conversation))
        if n % 2 == 1:  # end on an assistant message so the question follows a reply
            n += 1
        history = conversation[:n]
        hist_tokens = lengths[n - 1]
        line = f"history {hist_tokens:>6} tok"
        for _ in range(repeats):
            if "windowed" in arms:
                if n > written_upto:  # earlier turns: write the history up to here (untimed)
                    engine.write(session, history, history="full", mode="windowed")
                    written_upto = n
                res, latency, peak = _timed_chat(engine, session, history + [_QUESTION], mode="windowed",
                                                 history="full", max_new_tokens=new_tokens)
                results.append(TurnMeasure(hist_tokens, "windowed", res.usage.prompt_tokens, latency, peak,
                                           res.usage.completion_tokens, checkpoint=target))
                engine.rollback(session, res.turn - 1)  # undo the question + reply so every checkpoint is alike
                line += f" | windowed {latency:6.2f} s"
            if "full-context" in arms and (full_context_max is None or hist_tokens <= full_context_max):
                p, lat, peak = _full_context_turn(engine, history, _QUESTION, new_tokens)
                results.append(TurnMeasure(hist_tokens, "full-context", p, lat, peak, new_tokens, checkpoint=target))
                line += f" | full {lat:6.2f} s"
        if progress:
            print(line, flush=True)
    return results


def _bucket(history: int, checkpoints: tuple[int, ...]) -> int | None:
    """The checkpoint whose bucket ``(previous checkpoint, checkpoint]`` holds ``history`` (first: ``[0, c]``)."""
    previous = -1
    for c in checkpoints:
        if previous < history <= c or (previous < 0 and history <= c):
            return c
        previous = c
    return None


def summarize(results: list[TurnMeasure], checkpoints: tuple[int, ...] = DEFAULT_CHECKPOINTS) -> list[dict]:
    """One row per checkpoint: per arm the median latency, prompt tokens and peak memory; for online also the
    amortised mean (every turn of the bucket, re-prefills included) and the re-prefill turns themselves."""
    rows = []
    online = [r for r in results if r.arm == "online"]
    for c in checkpoints:
        row: dict = {"checkpoint": c}
        bucket = [r for r in online if _bucket(r.history_tokens, checkpoints) == c]
        steady = [r for r in bucket if r.kv_cache in ("hot", "new")]
        slides = [r for r in bucket if r.kv_cache in ("slid", "rebuilt")]
        if steady:
            row["online"] = {
                "turns": len(bucket),
                "latency_s": statistics.median(r.latency_s for r in steady),
                "prompt_tokens": max(r.prompt_tokens for r in bucket),
                "peak_extra_mib": max(r.peak_extra_mib for r in bucket),
            }
            row["online-amortised"] = {"latency_s": statistics.fmean(r.latency_s for r in bucket)}
            row["online-reprefills"] = [{"history_tokens": r.history_tokens, "latency_s": r.latency_s,
                                         "prompt_tokens": r.prompt_tokens} for r in slides]
        for arm in ("windowed", "full-context"):
            rs = [r for r in results if r.arm == arm and r.checkpoint == c]
            if rs:
                row[arm] = {
                    "history_tokens": rs[0].history_tokens,
                    "prompt_tokens": rs[0].prompt_tokens,
                    "latency_s": statistics.median(r.latency_s for r in rs),
                    "peak_extra_mib": max(r.peak_extra_mib for r in rs),
                }
        if "full-context" in row and "online-amortised" in row:
            row["full_over_online_amortised"] = row["full-context"]["latency_s"] / row["online-amortised"]["latency_s"]
        rows.append(row)
    return rows


def growth(rows: list[dict], arm: str) -> float | None:
    """``arm``'s latency, largest ÷ smallest over the checkpoints it has (1.0 = flat)."""
    values = [r[arm]["latency_s"] for r in rows if arm in r]
    return max(values) / min(values) if len(values) >= 2 else None


def last_over_first(rows: list[dict], arm: str) -> float | None:
    values = [r[arm]["latency_s"] for r in rows if arm in r]
    return values[-1] / values[0] if len(values) >= 2 else None


def format_table(rows: list[dict]) -> str:
    def cell(row: dict, arm: str, key: str, fmt: str) -> str:
        return format(row[arm][key], fmt) if arm in row and key in row[arm] else "–"

    lines = [
        "| history ≤ tokens | online turns | online prompt (max) | online latency (s) | online amortised (s) | "
        "re-prefills (s) | online peak +MiB | windowed latency (s) | windowed peak +MiB | full prompt | "
        "full latency (s) | full peak +MiB | full ÷ online amortised |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        slides = ", ".join(f"{s['latency_s']:.2f}" for s in r.get("online-reprefills", [])) or "–"
        ratio = f"{r['full_over_online_amortised']:.2f}" if "full_over_online_amortised" in r else "–"
        lines.append(
            f"| {r['checkpoint']} | {cell(r, 'online', 'turns', 'd')} | {cell(r, 'online', 'prompt_tokens', 'd')} | "
            f"{cell(r, 'online', 'latency_s', '.2f')} | {cell(r, 'online-amortised', 'latency_s', '.2f')} | "
            f"{slides} | {cell(r, 'online', 'peak_extra_mib', '.1f')} | {cell(r, 'windowed', 'latency_s', '.2f')} | "
            f"{cell(r, 'windowed', 'peak_extra_mib', '.1f')} | {cell(r, 'full-context', 'prompt_tokens', 'd')} | "
            f"{cell(r, 'full-context', 'latency_s', '.2f')} | {cell(r, 'full-context', 'peak_extra_mib', '.1f')} | "
            f"{ratio} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], results: list[TurnMeasure], path: str | Path) -> None:
    plt = pyplot("eval", "the conversation benchmark's plot")

    cs = [r["checkpoint"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    online = [r for r in results if r.arm == "online"]
    if online:
        a1.plot([max(r.history_tokens, 256) for r in online], [r.latency_s for r in online], ".", color="tab:blue",
                alpha=0.25, label="online (every turn)")
        slides = [r for r in online if r.kv_cache in ("slid", "rebuilt")]
        a1.plot([r.history_tokens for r in slides], [r.latency_s for r in slides], "v", color="tab:red",
                label="online re-prefill turns")
    series = (("online", "o-", "online (median turn)"), ("online-amortised", "D-", "online (amortised)"),
              ("windowed", "s-", "windowed"), ("full-context", "^--", "full context, no cache"))
    for arm, style, label in series:
        pts = [(r["checkpoint"], r[arm]) for r in rows if arm in r]
        if pts:
            a1.plot([p[0] for p in pts], [p[1]["latency_s"] for p in pts], style, label=label)
        mem = [(c, v["peak_extra_mib"]) for c, v in pts if "peak_extra_mib" in v]
        if mem:
            a2.plot([m[0] for m in mem], [m[1] for m in mem], style, label=label)
    for ax, title in ((a1, "per-turn latency (s)"), (a2, "peak memory above the turn's start (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cs, [f"{c // 1024}k" for c in cs])
        ax.set_xlabel("conversation history (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- resume
@dataclass
class ResumeMeasure:
    history_tokens: int
    from_disk_s: float
    re_prefill_s: float
    from_disk_kv: str | None
    re_prefill_kv: str | None
    file_mib: float

    @property
    def speedup(self) -> float:
        return self.re_prefill_s / self.from_disk_s


def run_resume_benchmark(engine, *, histories: tuple[int, ...] = (4096, 8192), new_tokens: int = 16,
                         progress: bool = True) -> list[ResumeMeasure]:
    """A session of ``h`` tokens is written by one engine that saves its KV cache on disk when it closes (a
    restart); then the next turn is timed in a fresh engine that loads the file, and the same turn in another
    fresh engine that re-prefills from text (a copy of the same SQLite store, so both start alike)."""
    from ..engine import MemoryEngine

    pair = (engine.model, engine.tokenizer)
    out: list[ResumeMeasure] = []
    rng = random.Random(1)
    for h in histories:
        with tempfile.TemporaryDirectory(prefix="deltamem-resume-") as tmp:
            root = Path(tmp)
            db, kv = root / "a.db", root / "kv"
            writer = MemoryEngine(pair, store=f"sqlite:///{db}", kv_cache_dir=kv, kv_tokens=engine.kv_tokens)
            msgs: list[dict[str, str]] = []
            written = 0
            while written < h:
                msgs += [{"role": "user", "content": _content(rng, 170)},
                         {"role": "assistant", "content": _content(rng, 30)}]
                written = writer.write("s", msgs, history="full").written_tokens + written
            writer.close()
            shutil.copy(db, root / "b.db")
            question = msgs + [_QUESTION]
            disk_engine = MemoryEngine(pair, store=f"sqlite:///{db}", kv_cache_dir=kv, kv_tokens=engine.kv_tokens)
            r_disk, t_disk, _ = _timed_chat(disk_engine, "s", question, max_new_tokens=new_tokens, history="full")
            disk_engine.close()
            text_engine = MemoryEngine(pair, store=f"sqlite:///{root / 'b.db'}", kv_tokens=engine.kv_tokens)
            r_text, t_text, _ = _timed_chat(text_engine, "s", question, max_new_tokens=new_tokens, history="full")
            text_engine.close()
            size = sum(p.stat().st_size for p in kv.iterdir()) / 2**20
        m = ResumeMeasure(written, t_disk, t_text, r_disk.kv_cache, r_text.kv_cache, size)
        out.append(m)
        if progress:
            print(f"resume at {written:>6} tok | from disk {t_disk:6.2f} s ({m.from_disk_kv}, file {size:.0f} MiB) | "
                  f"re-prefill {t_text:6.2f} s ({m.re_prefill_kv}) | speed-up {m.speedup:5.2f}x", flush=True)
    return out


def write_json(results: list[TurnMeasure], rows: list[dict], path: str | Path, *,
               resume: list[ResumeMeasure] | None = None, **context) -> None:
    payload = {
        "context": {"torch": torch.__version__, "threads": torch.get_num_threads(), **context},
        "summary": rows,
        "growth_largest_over_smallest": {arm: growth(rows, arm) for arm in ARMS},
        "last_over_first": {arm: last_over_first(rows, arm) for arm in ARMS},
        "resume": [{**asdict(m), "speedup": m.speedup} for m in resume or []],
        "turns": [asdict(r) for r in results],
    }
    Path(path).write_text(json.dumps(payload, indent=2))
