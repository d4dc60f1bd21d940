"""One loaded model shared by every arm: prefix caching, greedy generation, choice likelihoods and δ-mem
write passes.

Arms differ only in which text goes into the prompt and what the memory does, so the model runs through one
small interface. A *prefix* (system prompt plus the history text an arm shows) is run once per history and its
key/value tensors are kept; each question then runs only its own tokens on a fresh cache built from them, so the
~200 LoCoMo questions of one conversation pay for the long prefix once. With δ-mem the state after the prefix is
kept too and re-installed before every question, so no question sees another's writes.

Memory modes:

* ``"off"``: the base model exactly (``memory_disabled``), for the baselines;
* ``"read"``: every token reads the state, nothing is written (``writes_disabled``): windowed δ-mem, whose
  history was written once by :meth:`LanguageModel.write_history`;
* ``"write"``: tokens read and write as they pass (the paper's online setting).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..models.kv_cache import cache_layers, forward_with_cache, new_cache

__all__ = ["LanguageModel", "Prefix"]

MODES = ("off", "read", "write")


@dataclass
class Prefix:
    """The cached start of a prompt: per-layer ``(key, value)`` tensors of batch 1, its length in tokens, and the
    δ-mem state after it (``None`` without memory)."""

    kv: list[tuple[Tensor, Tensor]] | None
    length: int
    state: Any = None
    mode: str = "off"


class LanguageModel:
    """A frozen causal LM (optionally wrapped by a :class:`~deltamem_agents.adapter.DeltaMemModel`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        memory: Any = None,
        *,
        choice_batch_tokens: int = 16384,
        prefill_chunk_tokens: int = 2048,
    ) -> None:
        self.memory = memory
        self.model = memory.base_model if memory is not None else model
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self.choice_batch_tokens = choice_batch_tokens
        if prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        eos: set[int] = set()
        for source in (getattr(tokenizer, "eos_token_id", None), getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list | tuple):
                eos.update(int(t) for t in source)
        self.eos_ids = frozenset(eos)
        self.tokens_processed = 0  # every token run through the model, writes included (a cost counter)

    @property
    def context_tokens(self) -> int:
        cfg = getattr(self.model, "config", None)
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(getattr(cfg, "max_position_embeddings", 0) or 8192)

    @property
    def has_memory(self) -> bool:
        return self.memory is not None

    # -- plumbing --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.memory is None:
            if mode != "off":
                raise ValueError(f"mode {mode!r} needs a δ-mem adapter")
            yield
        elif mode == "off":
            with self.memory.memory_disabled():
                yield
        elif mode == "read":
            with self.memory.writes_disabled():
                yield
        else:
            yield

    def _forward(self, ids: Tensor, cache: Any, logits_to_keep: int = 1, segment_ids: Tensor | None = None) -> Any:
        self.tokens_processed += int(ids.numel())
        model: Any = self.model
        kwargs: dict[str, Any] = {"logits_to_keep": logits_to_keep}
        if self.memory is not None:
            model, kwargs["segment_ids"] = self.memory, segment_ids
        if cache is None:
            return model(input_ids=ids, use_cache=False, **kwargs)
        return forward_with_cache(model, cache, ids, **kwargs)

    def _cache(self, prefix: Prefix, batch: int) -> Any:
        if prefix.kv is None:
            return new_cache(self.model.config)
        return new_cache(self.model.config, [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                             for k, v in prefix.kv])

    def _install_state(self, prefix: Prefix, batch: int) -> None:
        if self.memory is None or prefix.mode == "off":
            return
        if prefix.state is None:
            self.memory.reset_state(batch)
        else:
            self.memory.set_state(prefix.state.select([0] * batch))

    def _tensor(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        return t if t.dim() == 2 else t[None]

    # -- prefixes and writes -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefix(self, ids: Sequence[int], mode: str = "off", state: Any = None) -> Prefix:
        """Run ``ids`` once and keep its key/value tensors (and, with memory, the state after it).

        ``state`` is the state to start from (``None``: a fresh one); in ``"write"`` mode the prefix's tokens are
        written into it, in ``"read"`` mode it is only read. Long prefixes run in pieces of
        ``prefill_chunk_tokens`` on one growing cache, which bounds the attention scores' memory (an 8k-token
        prompt in one call would materialise 8k × 8k scores per head) without changing the result.
        """
        if mode != "off" and self.memory is None:
            raise ValueError(f"mode {mode!r} needs a δ-mem adapter")
        start = Prefix(None, 0, state, mode)
        if not ids:
            return start
        self._install_state(start, 1)
        cache = self._cache(start, 1)
        step = self.prefill_chunk_tokens
        with self._mode(mode):
            for start in range(0, len(ids), step):
                self._forward(self._tensor(ids[start : start + step]), cache)
        kv = cache_layers(cache)
        after = self.memory.get_state() if self.memory is not None and mode != "off" else None
        return Prefix(kv, len(ids), after, mode)

    @torch.inference_mode()
    def write_history(self, messages: Sequence[Sequence[int]], chunk_tokens: int = 2048) -> Any:
        """Write every message into a fresh δ-mem state, once, and return the state.

        Messages are packed, whole and in order, into forward calls of at most ``chunk_tokens`` tokens (a longer
        message gets calls of its own); each call starts at position 0 with an empty cache, as the training write
        pass does, so writing costs O(length × chunk) rather than a growing cache. With sequence-state write
        every message carries its own segment id and is written once even when split across calls; the last
        message is closed by one extra token with a new id (that token stays pending and is never written, as
        later calls only read).

        ``chunk_tokens = 0``: one call per message, each from position 0 — exactly how the windowed engine writes
        (and how the ladder trainer's write pass does).
        """
        if self.memory is None:
            raise ValueError("write_history needs a δ-mem adapter")
        if chunk_tokens < 0:
            raise ValueError("chunk_tokens must be >= 0 (0: one call per message)")
        if chunk_tokens == 0:
            ssw0 = self.memory.config.write_mode == "ssw"
            self.memory.reset_state(1)
            for index, ids in enumerate(messages):
                if ids:
                    seg = self._tensor([index] * len(ids)) if ssw0 else None
                    self._forward(self._tensor(list(ids)), None, segment_ids=seg)
            if ssw0 and messages:
                closer = [next(iter(self.eos_ids)) if self.eos_ids else 0]
                self._forward(self._tensor(closer), None, segment_ids=self._tensor([len(messages)]))
            return self.memory.get_state()
        ssw = self.memory.config.write_mode == "ssw"
        self.memory.reset_state(1)
        batch_ids: list[int] = []
        batch_seg: list[int] = []

        def flush() -> None:
            if batch_ids:
                seg = self._tensor(batch_seg) if ssw else None
                self._forward(self._tensor(batch_ids), None, segment_ids=seg)
                batch_ids.clear()
                batch_seg.clear()

        for index, ids in enumerate(messages):
            if batch_ids and len(batch_ids) + len(ids) > chunk_tokens:
                flush()
            for start in range(0, len(ids), chunk_tokens):
                piece = list(ids[start : start + chunk_tokens])
                if batch_ids and len(batch_ids) + len(piece) > chunk_tokens:
                    flush()
                batch_ids.extend(piece)
                batch_seg.extend([index] * len(piece))
        flush()
        if ssw and messages:
            closer = [next(iter(self.eos_ids)) if self.eos_ids else 0]
            self._forward(self._tensor(closer), None, segment_ids=self._tensor([len(messages)]))
        return self.memory.get_state()

    # -- answering -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prefix: Prefix, suffix: Sequence[int], max_new_tokens: int) -> tuple[str, list[int]]:
        """Greedy continuation of ``prefix + suffix``; stops at an end-of-turn token. Returns (text, ids)."""
        if not suffix:
            raise ValueError("generate needs at least one suffix token (the question)")
        self._install_state(prefix, 1)
        cache = self._cache(prefix, 1)
        out: list[int] = []
        ids = list(suffix)
        with self._mode(prefix.mode):
            for _ in range(max_new_tokens):
                logits = self._forward(self._tensor(ids), cache).logits[0, -1]
                nxt = int(torch.argmax(logits))
                if nxt in self.eos_ids:
                    break
                out.append(nxt)
                ids = [nxt]
        return self.tokenizer.decode(out, skip_special_tokens=True).strip(), out

    @torch.inference_mode()
    def choice_logprobs(
        self, prefix: Prefix, suffix: Sequence[int], choices: Sequence[Sequence[int]]
    ) -> list[tuple[float, int]]:
        """``(sum of log-probs, number of tokens)`` of each choice's tokens after ``prefix + suffix``.

        Choices run as one right-padded batch (padding sits after every real token, so causal attention keeps
        it out of the scored positions and no mask is needed; with online δ-mem a padded token writes only after
        every scored position has read). The batch is split when ``batch × prefix`` would exceed
        ``choice_batch_tokens`` so a long cached prefix is not copied too many times.
        """
        if not choices or any(len(c) == 0 for c in choices):
            raise ValueError("every choice needs at least one token")
        per_batch = max(1, self.choice_batch_tokens // max(1, prefix.length))
        results: list[tuple[float, int]] = []
        for start in range(0, len(choices), per_batch):
            results += self._choice_batch(prefix, suffix, choices[start : start + per_batch])
        return results

    def _choice_batch(
        self, prefix: Prefix, suffix: Sequence[int], choices: Sequence[Sequence[int]]
    ) -> list[tuple[float, int]]:
        batch, longest = len(choices), max(len(c) for c in choices)
        pad = next(iter(self.eos_ids)) if self.eos_ids else 0
        rows = [list(suffix) + list(c) + [pad] * (longest - len(c)) for c in choices]
        self._install_state(prefix, batch)
        cache = self._cache(prefix, batch)
        with self._mode(prefix.mode):
            # Keep logits from the last suffix token on: they predict the choice tokens.
            logits = self._forward(self._tensor(rows), cache, logits_to_keep=longest + 1).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for b, c in enumerate(choices):
            target = torch.tensor(c, device=logprobs.device)
            lp = logprobs[b, : len(c)].gather(-1, target[:, None])[:, 0]
            out.append((float(lp.sum()), len(c)))
        return out

