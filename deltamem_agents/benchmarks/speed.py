"""Speed of δ-mem against the plain model, measured in one run (``deltamem bench speed``).

Both arms run the *same* weights in the same process: the plain arm is the base model with every δ-mem hook
removed (:meth:`DeltaMemModel.hooks_removed`), the δ-mem arm the hooked model writing and reading its state.
Arms alternate round by round so that drift in machine load hits both alike; the median of the rounds is
reported, and the ratio δ-mem ÷ plain is what matters (these machines are shared and noisy).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapter import DeltaMemConfig, DeltaMemModel, attach
from ..models.kv_cache import CacheNotUsedError, cache_argument, cache_length, forward_with_cache, new_cache

__all__ = [
    "SpeedResult",
    "format_table",
    "run_speed_benchmark",
    "write_json",
]


@dataclass
class SpeedResult:
    """One measured quantity for both arms (tokens per second, medians over rounds)."""

    name: str
    tokens: int
    plain_tok_s: float
    deltamem_tok_s: float
    plain_rounds: list[float] = field(default_factory=list)
    deltamem_rounds: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.deltamem_tok_s / self.plain_tok_s


def _prompt(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _time_prefill(model, dm: DeltaMemModel | None, ids: torch.Tensor) -> float:
    if dm is not None:
        dm.reset_state(1)
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t0


@torch.inference_mode()
def _time_decode(model, dm: DeltaMemModel | None, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode of ``new_tokens`` one at a time with a KV cache, after an untimed prefill."""
    if dm is not None:
        dm.reset_state(1)
    cache = new_cache((dm.base_model if dm is not None else model).config)
    out = forward_with_cache(model, cache, ids)
    token = out.logits[:, -1:].argmax(-1)
    name = cache_argument(model)
    t0 = time.perf_counter()
    for _ in range(new_tokens):  # the checked call's two length reads stay out of the timed loop
        out = model(token, use_cache=True, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
    if cache_length(cache) != ids.shape[1] + new_tokens:
        raise CacheNotUsedError(f"decode benchmark: the cache holds {cache_length(cache)} tokens, expected "
                                f"{ids.shape[1] + new_tokens}")
    return time.perf_counter() - t0


def run_speed_benchmark(
    model,
    config: DeltaMemConfig | None = None,
    *,
    prefill_lengths: tuple[int, ...] = (128, 512, 2048),
    decode_tokens: int = 64,
    decode_prompt: int = 128,
    rounds: int = 5,
    warmup: int = 1,
    progress: bool = True,
) -> list[SpeedResult]:
    """Measure prefill and decode tokens/s of ``model`` with and without δ-mem, alternating arms each round."""
    dm = attach(model, config or DeltaMemConfig())
    dm.eval()
    vocab = model.config.vocab_size
    results: list[SpeedResult] = []
    try:
        jobs = [(f"prefill_{n}", n, lambda m, d, n=n: _time_prefill(m, d, _prompt(n, vocab))) for n in prefill_lengths]
        jobs.append(
            (
                "decode",
                decode_tokens,
                lambda m, d: _time_decode(m, d, _prompt(decode_prompt, vocab, 1), decode_tokens),
            )
        )
        for name, tokens, fn in jobs:
            plain, delta = [], []
            for i in range(warmup + rounds):
                # alternate which arm goes first so neither always runs on a warmer cache
                order = ("plain", "delta") if i % 2 == 0 else ("delta", "plain")
                for arm in order:
                    if arm == "plain":
                        with dm.hooks_removed() as base:
                            t = fn(base, None)
                        if i >= warmup:
                            plain.append(tokens / t)
                    else:
                        t = fn(dm, dm)
                        if i >= warmup:
                            delta.append(tokens / t)
            res = SpeedResult(name, tokens, statistics.median(plain), statistics.median(delta), plain, delta)
            results.append(res)
            if progress:
                print(
                    f"{name:>14}: plain {res.plain_tok_s:8.1f} tok/s   δ-mem {res.deltamem_tok_s:8.1f} tok/s   "
                    f"ratio {res.ratio:.3f}",
                    flush=True,
                )
    finally:
        dm.detach_adapter()
    return results


def format_table(results: list[SpeedResult]) -> str:
    lines = [
        "| measure | tokens | plain tok/s | δ-mem tok/s | δ-mem ÷ plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.tokens} | {r.plain_tok_s:.1f} | {r.deltamem_tok_s:.1f} | {r.ratio:.3f} |")
    return "\n".join(lines)


def write_json(results: list[SpeedResult], path: str | Path, **context) -> None:
    payload = {
        "context": {"torch": torch.__version__, "threads": torch.get_num_threads(), **context},
        "results": [{**asdict(r), "ratio": r.ratio} for r in results],
    }
    Path(path).write_text(json.dumps(payload, indent=2))
