"""Next-token choice: greedy, or temperature / top-k / top-p sampling with an optional seed; an optional
repetition penalty over the tokens generated so far.

The penalty (CTRL's rule, as transformers and llama.cpp apply it: a positive logit is divided by the penalty, a
negative one multiplied) covers only the **generated** tokens, not the prompt: a memory engine must be free to
repeat what the conversation said ("your code is 4417"), while a small model's loops are loops over its own
output."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingParams", "Sampler"]


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy (argmax; top_k/top_p/seed ignored)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float)
                or not 0 <= self.temperature < float("inf")):  # also refuses NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")
        if (isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, int | float)
                or not 0 < self.repetition_penalty < float("inf")):
            raise ValueError(f"repetition_penalty must be a positive number, got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks tokens for one generation. Its own ``torch.Generator`` keeps concurrent generations independent
    (and a seeded one reproducible) whatever else runs in the process."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, logits: Tensor, generated: list[int] | None = None) -> int:
        """``logits (V,)`` of the next position (and the tokens generated so far) → token id."""
        p = self.params
        if p.repetition_penalty != 1.0 and generated:
            logits = logits.detach().to("cpu", torch.float32).clone()
            seen = torch.tensor(sorted(set(generated)), dtype=torch.long)
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        scores = logits.detach().to("cpu", torch.float32) / float(p.temperature)
        if p.top_k is not None and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # drop tokens once the mass *before* them reaches top_p (the first token always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
