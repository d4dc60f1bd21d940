"""The decode loop: prefill, then one token at a time with a KV cache; sampling, stop strings, EOS, streaming.

Generation never writes into the state (every generated token reads the state the prompt read); the reply is
written afterwards as a message, exactly as a resent copy of it would be (see :mod:`.engine`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..adapter import DeltaMemState
from .batching import ModelRunner
from .detokenize import TextAccumulator
from .sampling import Sampler, SamplingParams

__all__ = ["GenerationEvent", "generate"]


@dataclass
class GenerationEvent:
    """A text delta; the last event has ``finish_reason`` set and ``tokens`` = the generated count."""

    text: str
    finish_reason: str | None = None
    tokens: int = 0
    full_text: str = ""


def generate(
    runner: ModelRunner,
    state: DeltaMemState,
    cache: Any,
    prompt_tail: list[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: set[int],
    stop: Sequence[str],
    tokenizer: Any,
    cancelled: Any = None,
) -> Iterator[GenerationEvent]:
    """Generate a reply (writes off).

    Args:
        state: the 1-row state every position reads.
        cache: a KV cache already holding the prompt before ``prompt_tail`` (may be empty); extended here.
        prompt_tail: the last prompt tokens, run in the first (prefill) call.
        cancelled: optional ``threading.Event``; when set, generation ends with ``finish_reason="cancelled"``.
    """
    sampler = Sampler(params)
    acc = TextAccumulator(tokenizer, stop)
    if max_new_tokens <= 0:
        yield GenerationEvent("", "length", 0, "")
        return
    logits, _ = runner.forward(state, prompt_tail, cache=cache, writes=False)
    count = 0
    generated: list[int] = []
    while True:
        token = sampler(logits, generated)
        generated.append(token)
        if token in eos_ids:
            yield GenerationEvent(acc.finish(), "stop", count, acc.text)
            return
        count += 1
        delta, hit = acc.push(token)
        if hit:
            yield GenerationEvent(delta, "stop", count, acc.text)
            return
        if count >= max_new_tokens:
            yield GenerationEvent(delta + acc.finish(), "length", count, acc.text)
            return
        if cancelled is not None and cancelled.is_set():
            yield GenerationEvent(delta + acc.finish(), "cancelled", count, acc.text)
            return
        if delta:
            yield GenerationEvent(delta)
        logits, _ = runner.forward(state, [token], cache=cache, writes=False)
