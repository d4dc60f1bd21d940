"""Turning :class:`MemoryExample` groups into padded token batches for the write and read passes.

Padding conventions (and why they are correct):

* **Write pass, right padding.** Real tokens keep positions ``0..n-1``; the pads come after every real token, so
  causal attention never lets a real token see them, and the attention mask turns them into no-op writes
  (β = 0, λ = 1: the δ-mem pre-hook derives the write mask from ``attention_mask``). The state after the call is
  therefore the state after each row's last real token.
* **Read pass, left padding**, with explicit ``position_ids = cumsum(mask) − 1``. The answer tokens of every row
  then sit at the end, so only the last ``A + 1`` positions need logits (``logits_to_keep``) — the 49k-wide LM
  head is the single most expensive op of a short read pass. Writes are off, so pads change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "IGNORE",
    "ReadBatch",
    "WriteBatch",
    "encode_context",
    "encode_prompt_answer",
    "pad_read",
    "pad_write",
    "render_pieces",
]

IGNORE = -100


def render_pieces(tokenizer: Any, messages: list[dict[str, str]]) -> list[str]:
    """The chat-template text of each message (piece ``i`` is what message ``i`` adds to the rendering).

    A template may inject text of its own (SmolLM2 adds a default system prompt when there is none); it lands in
    the piece of the message that triggered it. Falls back to one piece when the template is not prefix-stable.
    """
    pieces: list[str] = []
    prev = ""
    for i in range(len(messages)):
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(prev):
            return [tokenizer.apply_chat_template(messages, tokenize=False)]
        pieces.append(text[len(prev) :])
        prev = text
    return pieces


def encode_context(
    tokenizer: Any, messages: list[dict[str, str]], max_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and each token's message index (for SSW), keeping the last
    ``max_tokens`` tokens."""
    ids: list[int] = []
    seg: list[int] = []
    for j, piece in enumerate(render_pieces(tokenizer, messages)):
        t = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        seg.extend([j] * len(t))
    return ids[-max_tokens:], seg[-max_tokens:]


def encode_prompt_answer(
    tokenizer: Any, messages: list[dict[str, str]], answer: str | None
) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)``: the prompt ends with the assistant header (generation prompt); the answer is
    the assistant's text plus the template's end-of-turn marker (so the model also learns to stop)."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return p_ids, []
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    suffix = full[len(prompt) :] if full.startswith(prompt) else answer
    suffix = suffix.rstrip("\n")
    return p_ids, tokenizer(suffix, add_special_tokens=False)["input_ids"]


@dataclass
class WriteBatch:
    """Right-padded context. ``input_ids``, ``attention_mask``, ``segment_ids``, ``position_ids``: ``(B, T)``."""

    input_ids: Tensor
    attention_mask: Tensor
    segment_ids: Tensor
    position_ids: Tensor


@dataclass
class ReadBatch:
    """Left-padded prompt + answer rows. All ``(R, T)``; ``labels`` is ``IGNORE`` except on answer tokens;
    ``keep`` = number of final positions whose logits are needed; ``segment_ids`` for online SSW."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    keep: int
    segment_ids: Tensor | None = None


def pad_write(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str = "cpu") -> WriteBatch:
    """Right-pad ``(ids, segment ids)`` rows. Pads repeat the row's last segment id (they are never written)."""
    B, T = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (i, s) in enumerate(rows):
        n = len(i)
        ids[b, :n] = torch.tensor(i)
        seg[b, :n] = torch.tensor(s)
        seg[b, n:] = s[-1] if s else 0
        mask[b, :n] = 1
    pos = torch.arange(T).expand(B, T).clone()
    return WriteBatch(ids.to(device), mask.to(device), seg.to(device), pos.to(device))


def pad_read(
    rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str = "cpu",
    segments: list[list[int]] | None = None,
) -> ReadBatch:
    """Left-pad ``(prompt ids, answer ids)`` rows; labels mark the answer tokens.

    ``labels[b, t]`` is the token at ``t`` when it belongs to the answer: the logit predicting it is at ``t − 1``.
    """
    seqs = [p + a for p, a in rows]
    R, T = len(rows), max(len(s) for s in seqs)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(R, T, dtype=torch.long)
    seg = torch.zeros(R, T, dtype=torch.long) if segments is not None else None
    for b, ((_, a), s) in enumerate(zip(rows, seqs, strict=True)):
        off = T - len(s)
        ids[b, off:] = torch.tensor(s)
        mask[b, off:] = 1
        if a:
            labels[b, T - len(a) :] = torch.tensor(a)
        if seg is not None:
            sg = segments[b]
            seg[b, off:] = torch.tensor(sg)
            seg[b, :off] = sg[0] if sg else 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    keep = max(len(a) for _, a in rows) + 1
    return ReadBatch(ids.to(device), mask.to(device), pos.to(device), labels.to(device), min(keep, T),
                     None if seg is None else seg.to(device))
