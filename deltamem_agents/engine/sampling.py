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

from .options import check_int, check_seed, finite

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
        # Each refusal is an InvalidOptionError (a ValueError) naming the option; NaN and infinities included.
        finite("temperature", self.temperature, low=0, low_open=False)
        finite("top_p", self.top_p, low=0, low_open=True, high=1, high_open=False)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
        check_seed(self.seed)
        finite("repetition_penalty", self.repetition_penalty, low=0, low_open=True)

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
