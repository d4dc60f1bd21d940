"""The decode loop: prefill, then one token at a time with a KV cache; sampling, stop strings, EOS, streaming.

Generation never writes into the state (every generated token reads the state the prompt read); the reply is
written afterwards as a message, exactly as a resent copy of it would be (see :mod:`.engine`).

What happens between two forward calls of one session — sample, EOS, stop strings, the length limit,
cancellation — is :class:`TokenDecoder`, shared by both ways of running the forward calls:

* alone (the reference, and the default): :func:`generate` runs every decode step itself, one session per
  forward call;
* batched (``MemoryEngine(batch_decode=True)``): after its own prefill the session hands its cache and decoder
  to a :class:`~.decode_batcher.DecodeBatcher`, which runs the decode steps of every generating session as one
  batched forward and streams each session's events back to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..adapter import DeltaMemState
from .batching import ModelRunner
from .detokenize import TextAccumulator
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .decode_batcher import DecodeBatcher

__all__ = ["GenerationEvent", "TokenDecoder", "generate"]


@dataclass
class GenerationEvent:
    """A text delta; the last event has ``finish_reason`` set and ``tokens`` = the generated count."""

    text: str
    finish_reason: str | None = None
    tokens: int = 0
    full_text: str = ""


class TokenDecoder:
    """One session's decisions between forward calls (no model calls: whoever runs the model feeds it logits).

    Args:
        tokenizer: decodes the generated ids for streaming and stop strings.
        params: sampling parameters (a per-session generator: concurrent sessions stay independent).
        eos_ids: ids that end generation (not part of the text).
        stop: stop strings (cut from the text).
        max_new_tokens: the length limit (``finish_reason="length"``).
        cancelled: optional ``threading.Event``; when set, generation ends with ``finish_reason="cancelled"``.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: set[int], stop: Sequence[str],
                 max_new_tokens: int, cancelled: Any = None) -> None:
        self.sampler = Sampler(params)
        self.acc = TextAccumulator(tokenizer, stop)
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.cancelled = cancelled
        self.generated: list[int] = []
        self.count = 0

    def step(self, logits: Tensor) -> tuple[GenerationEvent | None, int | None]:
        """Take the logits ``(V,)`` of the next position.

        Returns:
            ``(event, token)``: the event to stream (``None``: no new text yet) and the token to run through the
            model next; ``token is None`` when generation ended (then ``event.finish_reason`` is set and the
            last sampled token is not run: it is EOS, or the text is complete).
        """
        token = self.sampler(logits, self.generated)
        self.generated.append(token)
        if token in self.eos_ids:
            return GenerationEvent(self.acc.finish(), "stop", self.count, self.acc.text), None
        self.count += 1
        delta, hit = self.acc.push(token)
        if hit:
            return GenerationEvent(delta, "stop", self.count, self.acc.text), None
        if self.count >= self.max_new_tokens:
            return GenerationEvent(delta + self.acc.finish(), "length", self.count, self.acc.text), None
        if self.cancelled is not None and self.cancelled.is_set():
            return GenerationEvent(delta + self.acc.finish(), "cancelled", self.count, self.acc.text), None
        return (GenerationEvent(delta) if delta else None), token


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
    batcher: DecodeBatcher | None = None,
) -> Iterator[GenerationEvent]:
    """Generate a reply (writes off).

    Args:
        state: the 1-row state every position reads.
        cache: a KV cache already holding the prompt before ``prompt_tail`` (may be empty); extended here. When
            generation ends it holds the prompt and every generated token that was run (all but the last), in
            both paths.
        prompt_tail: the last prompt tokens, run in the first (prefill) call.
        cancelled: optional ``threading.Event``; when set, generation ends with ``finish_reason="cancelled"``.
        batcher: ``None``: every decode step is this session's own forward call (the reference path). Otherwise
            the prefill runs here and the decode steps run batched with other sessions' in ``batcher``.
    """
    if max_new_tokens <= 0:
        yield GenerationEvent("", "length", 0, "")
        return
    decoder = TokenDecoder(tokenizer, params, eos_ids, stop, max_new_tokens, cancelled)
    logits, _ = runner.forward(state, prompt_tail, cache=cache, writes=False)
    event, token = decoder.step(logits)
    if event is not None:
        yield event
    if token is None:
        return
    if batcher is not None and batcher.accepts(cache):
        yield from batcher.decode(decoder, state, cache, token)
        return
    while True:
        logits, _ = runner.forward(state, [token], cache=cache, writes=False)
        event, token = decoder.step(logits)
        if event is not None:
            yield event
        if token is None:
            return
