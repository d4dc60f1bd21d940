"""Batched decode vs one forward call at a time, measured in one run (``deltamem bench batched``).

Two measures, each with both arms in the same process on the same δ-mem model, alternating round by round
(medians reported; the ratio batched ÷ alone is what matters on a shared machine):

* ``engine``: ``N`` sessions call ``engine.chat`` at the same time from ``N`` threads (fresh sessions, greedy,
  ``max_new_tokens`` each); one engine with ``batch_decode=False`` (every forward call one session's, the
  default), one with ``batch_decode=True``. Tokens/s = generated tokens of all sessions ÷ wall time from the
  start of the threads to the last commit: prefills, writes and commits included, as a server sees it.
* ``decode``: the decode steps alone, no threads: ``N`` prefilled sessions run ``new_tokens`` steps each, either
  as ``N`` one-row forward calls per step or as one :class:`~deltamem_agents.engine.decode_group.DecodeGroup`
  step (prompts of different lengths, so rows are padded); the two arms alternate step by step. The upper bound
  of what batching can give.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BatchedResult", "format_table", "make_tiny_pair", "run_batched_benchmark", "write_json"]

_TOPICS = ("a lighthouse keeper", "a lost map", "the first snow", "a clockmaker", "two rival chefs",
           "a night train", "an old violin", "a desert city", "a quiet library", "a broken robot",
           "a mountain village", "a talking crow", "a sunken ship", "a spring festival", "a locked garden",
           "a traveling circus")


@dataclass
class BatchedResult:
    """One measure at one session count (tokens per second, medians over rounds)."""

    measure: str
    sessions: int
    tokens: int
    alone_tok_s: float
    batched_tok_s: float
    mean_rows: float
    alone_rounds: list[float] = field(default_factory=list)
    batched_rounds: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.batched_tok_s / self.alone_tok_s


def make_tiny_pair(tokenizer: Any) -> tuple[Any, Any]:
    """A tiny random Llama (2 layers, hidden 64) with the embedded tokenizer's vocabulary: the forward is cheap,
    so per-call overhead dominates (the case where batching helps most on a CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tokenizer


def _messages(i: int) -> list[dict[str, str]]:
    # prompts of different lengths, so that batched rows are padded
    text = f"Write a long story about {_TOPICS[i % len(_TOPICS)]}." + " Include many details." * (i % 4)
    return [{"role": "user", "content": text}]


def _engine_round(engine: Any, n: int, new_tokens: int, tag: str) -> tuple[int, float]:
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = engine.chat(f"{tag}-{i}", _messages(i), max_new_tokens=new_tokens, temperature=0.0,
                                     repetition_penalty=1.0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(r.usage.completion_tokens for r in results.values()), seconds


def _prefilled(runner: Any, engine: Any, n: int) -> list[tuple[Any, Any, int]]:
    """``n`` sessions' prompts run alone (untimed): ``(cache, state, first token)`` each."""
    from ..engine.messages import normalize_messages

    rows = []
    state = engine.model.new_state(1)
    for i in range(n):
        ids = engine.renderer.prompt_ids(normalize_messages(_messages(i)))
        cache = runner.new_cache()
        logits, _ = runner.forward(state, ids, cache=cache, writes=False)
        rows.append((cache, state, int(logits.argmax())))
    return rows


@torch.inference_mode()
def _decode_round(engine: Any, n: int, steps: int) -> tuple[int, float, float]:
    """Both arms step by step, interleaved (a step of the ``n`` sessions alone, then the same step batched), so
    that load changes on a shared machine hit both alike. Returns ``(tokens, alone_s, batched_s)``."""
    from ..engine.decode_group import DecodeGroup, GroupRow

    runner = engine.runner
    rows = _prefilled(runner, engine, n)  # untimed; each arm gets its own copy of the caches
    group = DecodeGroup(runner)
    group.add([GroupRow(cache, state) for cache, state, _ in _prefilled(runner, engine, n)])
    tokens = [t for _, _, t in rows]
    batched_tokens = list(tokens)
    alone_s = batched_s = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        for i, (cache, state, _) in enumerate(rows):
            logits, _ = runner.forward(state, [tokens[i]], cache=cache, writes=False)
            tokens[i] = int(logits.argmax())
        t1 = time.perf_counter()
        batched_tokens = group.step(batched_tokens).argmax(-1).tolist()
        t2 = time.perf_counter()
        alone_s, batched_s = alone_s + (t1 - t0), batched_s + (t2 - t1)
    group.clear()
    return n * steps, alone_s, batched_s


def run_batched_benchmark(
    model: Any,
    *,
    sessions: tuple[int, ...] = (1, 2, 4, 8),
    new_tokens: int = 32,
    rounds: int = 3,
    warmup: int = 1,
    measures: tuple[str, ...] = ("decode", "engine"),
    mode: str = "online",
    progress: bool = True,
) -> list[BatchedResult]:
    """Measure tokens/s of ``N`` concurrent sessions batched vs one at a time, for each ``N`` in ``sessions``.

    Args:
        model: a ``(model, tokenizer)`` pair, a path, or ``None`` (the embedded model); a fresh adapter is
            attached (the cost does not depend on its weights).
    """
    from ..engine import MemoryEngine, SamplingParams
    from ..store.memory import InMemorySessionStore

    greedy = SamplingParams(temperature=0.0)
    alone = MemoryEngine(model, adapter="none", store=InMemorySessionStore(), mode=mode, sampling=greedy)
    batched = MemoryEngine((alone.model, alone.tokenizer), store=InMemorySessionStore(), mode=mode,
                           sampling=greedy, batch_decode=True, batch_max_rows=max(sessions))
    results = []
    try:
        for measure in measures:
            for n in sessions:
                arms: dict[str, list[float]] = {"alone": [], "batched": []}
                counted: dict[str, int] = {}
                stats = batched.batch_stats()
                assert stats is not None
                steps0, rows0 = stats.steps, stats.row_steps
                for r in range(warmup + rounds):
                    if measure == "decode":
                        tokens, alone_s, batched_s = _decode_round(alone, n, new_tokens)
                        times = {"alone": (tokens, alone_s), "batched": (tokens, batched_s)}
                    else:
                        order = ("alone", "batched") if r % 2 == 0 else ("batched", "alone")
                        times = {arm: _engine_round(alone if arm == "alone" else batched, n, new_tokens,
                                                    f"{arm}-{n}-{r}") for arm in order}
                    if r >= warmup:
                        for arm, (tokens, seconds) in times.items():
                            arms[arm].append(tokens / seconds)
                            counted[arm] = tokens
                rows = ((stats.row_steps - rows0) / (stats.steps - steps0) if stats.steps > steps0
                        else float(n) if measure == "decode" else 0.0)
                res = BatchedResult(measure, n, counted["batched"], statistics.median(arms["alone"]),
                                    statistics.median(arms["batched"]), rows, arms["alone"], arms["batched"])
                results.append(res)
                if progress:
                    print(f"{measure:>7} N={n:<3}: alone {res.alone_tok_s:8.1f} tok/s   batched "
                          f"{res.batched_tok_s:8.1f} tok/s   ratio {res.ratio:5.2f}   rows/step {res.mean_rows:4.1f}",
                          flush=True)
    finally:
        alone.close()
        batched.close()
    return results


def format_table(results: list[BatchedResult]) -> str:
    lines = ["| measure | sessions | tokens per round | one at a time tok/s | batched tok/s | batched ÷ alone | "
             "rows per batched step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.measure} | {r.sessions} | {r.tokens} | {r.alone_tok_s:.1f} | {r.batched_tok_s:.1f} | "
                     f"{r.ratio:.2f} | {r.mean_rows:.1f} |")
    return "\n".join(lines)


def write_json(results: list[BatchedResult], path: str | Path, **meta: Any) -> None:
    rows = [asdict(r) | {"ratio": r.ratio} for r in results]
    Path(path).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
