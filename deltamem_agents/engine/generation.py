"""The decode loop: prefill, then one token at a time with a KV cache; sampling, stop strings, EOS, streaming.

By default generation never writes into the state (every generated token reads the state the prompt read); the
reply is written afterwards as a message, exactly as a resent copy of it would be (see :mod:`.engine`). The
authors' protocol (``MemoryEngine(protocol="authors")``, an option) runs with ``writes=True``: the prompt tail
(new messages and generation header) and every generated token but EOS are written as they are run.

What happens between two forward calls of one session — sample, EOS, stop strings, the length limit,
cancellation — is :class:`~.token_decoder.TokenDecoder`, shared by both ways of running the forward calls:

* alone (the reference, and the default): :func:`generate` runs every decode step itself, one session per
  forward call;
* batched (``MemoryEngine(batch_decode=True)``): after its own prefill the session hands its cache and decoder
  to a :class:`~.decode_batcher.DecodeBatcher`, which runs the decode steps of every generating session as one
  batched forward and streams each session's events back to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..adapter import DeltaMemState
from .batching import ModelRunner
from .sampling import SamplingParams
from .token_decoder import GenerationEvent, TokenDecoder

if TYPE_CHECKING:
    from .decode_batcher import DecodeBatcher

__all__ = ["generate"]


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
    writes: bool = False,
    prompt_segments: Sequence[int] | None = None,
    reply_segment: int | None = None,
) -> Iterator[GenerationEvent]:
    """Generate a reply (writes off, unless ``writes``).

    Args:
        state: the 1-row state every position reads.
        cache: a KV cache already holding the prompt before ``prompt_tail`` (may be empty); extended here. When
            generation ends it holds the prompt and every generated token that was run (all but the last), in
            both paths; with ``writes``, every generated token but an EOS.
        prompt_tail: the last prompt tokens ``(T,)``, run in the first (prefill) call.
        cancelled: optional ``threading.Event``; when set, generation ends with ``finish_reason="cancelled"``.
        batcher: ``None``: every decode step is this session's own forward call (the reference path). Otherwise
            the prefill runs here and the decode steps run batched with other sessions' in ``batcher``.
        writes: the authors' protocol: the prefill writes ``prompt_tail`` (SSW ids ``prompt_segments``, one per
            token), and each generated token but EOS is run with writes (SSW id ``reply_segment``) — the last
            one too (a reply cut by the length limit or a stop string), as their decode loop runs every token
            it keeps. The last event carries the state after all of it (:class:`GenerationEvent`). Not with
            ``batcher`` (batched decode steps never write).
    """
    if writes and batcher is not None:
        raise ValueError("generate: batched decode steps never write (writes=True needs batcher=None)")
    if max_new_tokens <= 0:
        if writes:  # the prompt is still ingested, as the authors' session does before its decode loop
            _, state = runner.forward(state, prompt_tail, cache=cache, writes=True, segment_id=prompt_segments,
                                      want_logits=False)
        yield GenerationEvent("", "length", 0, "", state=state if writes else None)
        return
    decoder = TokenDecoder(tokenizer, params, eos_ids, stop, max_new_tokens, cancelled)
    logits, after = runner.forward(state, prompt_tail, cache=cache, writes=writes, segment_id=prompt_segments)
    if writes:
        state = after
    ran: list[int] = []
    event, token = decoder.step(logits)
    if token is None:
        yield _last(runner, decoder, event, state, cache, ran, writes, reply_segment)
        return
    if event is not None:
        yield event
    if batcher is not None and batcher.accepts(cache):
        yield from batcher.decode(decoder, state, cache, token)
        return
    while True:
        logits, after = runner.forward(state, [token], cache=cache, writes=writes, segment_id=reply_segment)
        ran.append(token)
        if writes:
            state = after
        event, token = decoder.step(logits)
        if token is None:
            yield _last(runner, decoder, event, state, cache, ran, writes, reply_segment)
            return
        if event is not None:
            yield event


def _last(runner: ModelRunner, decoder: TokenDecoder, event: GenerationEvent | None, state: DeltaMemState,
          cache: Any, ran: list[int], writes: bool, reply_segment: int | None) -> GenerationEvent:
    """The final event; with ``writes`` the last generated token (unless EOS, or a cancelled turn) is run first."""
    assert event is not None and event.finish_reason is not None
    if not writes:
        return event
    last = decoder.generated[-1]
    if last not in decoder.eos_ids and event.finish_reason != "cancelled":
        _, state = runner.forward(state, [last], cache=cache, writes=True, segment_id=reply_segment,
                                  want_logits=False)
        ran.append(last)
    event.state, event.ran = state, ran
    return event
