"""`TokenDecoder`: one session's decisions between two forward calls (sample, EOS, stop strings, the length
limit, cancellation), and the :class:`GenerationEvent` it produces.

It calls no model: whoever runs the forward calls feeds it logits — :func:`~.generation.generate` when a session
decodes alone, :class:`~.decode_batcher.DecodeBatcher` when its decode steps run batched with other sessions'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..adapter import DeltaMemState
from .detokenize import TextAccumulator
from .sampling import Sampler, SamplingParams

__all__ = ["GenerationEvent", "TokenDecoder"]


@dataclass
class GenerationEvent:
    """A text delta; the last event has ``finish_reason`` set and ``tokens`` = the generated count.

    With ``writes=True`` the last event also carries ``state`` (the state after every write of the generation)
    and ``ran`` (the generated ids that were run through the model, in order: all but an EOS).
    """

    text: str
    finish_reason: str | None = None
    tokens: int = 0
    full_text: str = ""
    state: DeltaMemState | None = None
    ran: list[int] = field(default_factory=list)


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
