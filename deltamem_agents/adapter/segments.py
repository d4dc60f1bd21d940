"""Sequence-state write (SSW): one write per message, planned once per forward call.

A message ("segment") is written once, as the mean of its tokens' memory projections (the projections are linear,
so this equals projecting the mean hidden state). Its tokens read the state from *before* that write. A message
is written when the next message starts, so the last message of a call stays open (its running sum and token
count are carried in the state) and a message split across calls — chunked prefill, a prompt followed by
generated tokens — still gets exactly one write.

We run this with the ordinary delta-rule scan on an *extended* sequence: every token becomes a read-only step
(write masked) and every closing message adds one write step placed after its last token and before the first
token of the next message. Slot 0 is the message left open by the previous call (possibly empty); slot ``j ≥ 1``
is the ``j``-th message that starts in this call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SegmentPlan:
    """Where each token and each message write goes in the extended sequence (shared by all layers).

    Attributes:
        mask: ``(B, T)`` float, 1 for tokens that count (not padding).
        token_slot: ``(B, T)`` message slot of each token.
        token_pos: ``(B, T)`` position of each token's read step in the extended sequence.
        write_pos: ``(B, S)`` position of slot ``s``'s write step; ``ext_len`` (a discarded dump position) when
            the slot is not written in this call.
        write_valid: ``(B, S)`` bool, slot ``s`` is closed in this call and has tokens.
        counts: ``(B, S)`` float, tokens per slot (slot 0 includes the open message's earlier tokens).
        last_slot: ``(B,)`` the slot left open at the end of the call.
        ext_len: length of the extended sequence.
        last_segment: ``(B,)`` id of the message left open.
    """

    mask: Tensor
    token_slot: Tensor
    token_pos: Tensor
    write_pos: Tensor
    write_valid: Tensor
    counts: Tensor
    last_slot: Tensor
    ext_len: int
    last_segment: Tensor

    @property
    def num_slots(self) -> int:
        return self.counts.shape[1]


def auto_segment_ids(mask: Tensor, last_segment: Tensor) -> Tensor:
    """Ids that make every unmasked token its own message (generated tokens are one-token writes)."""
    return last_segment[:, None] + torch.cumsum(mask.long(), dim=1)


def plan_segments(
    segment_ids: Tensor | None, mask: Tensor | None, last_segment: Tensor, pending_count: Tensor
) -> SegmentPlan:
    """Plan the SSW writes of one forward call.

    Args:
        segment_ids: ``(B, T)`` int message id of each token, non-decreasing along each row over unmasked tokens
            and ``>= last_segment`` (equal continues the open message); ``None``: every token its own message.
        mask: ``(B, T)`` bool, False for padding; ``None``: no padding.
        last_segment: ``(B,)`` id of the message left open by the previous call (``-1``: none).
        pending_count: ``(B,)`` tokens already in that open message.
    """
    if mask is None:
        B, T = (segment_ids.shape if segment_ids is not None else (last_segment.shape[0], 0))
        mask = torch.ones(B, T, dtype=torch.bool, device=last_segment.device)
    B, T = mask.shape
    if segment_ids is None:
        seg = auto_segment_ids(mask, last_segment)
    else:
        seg = segment_ids.to(device=mask.device, dtype=torch.long)
        if seg.shape != (B, T):
            raise ValueError(f"segment_ids must have shape {(B, T)}, got {tuple(seg.shape)}")
        floor = torch.where(mask, seg, last_segment[:, None])
        prev = torch.cat([last_segment[:, None], torch.cummax(floor, dim=1).values[:, :-1]], dim=1)
        if bool((mask & (seg < prev)).any()):
            raise ValueError(
                "segment_ids must be non-decreasing along each row and not below the id of the message "
                "still open in the state"
            )
    # Ids are non-decreasing over unmasked tokens, so a running max fills padding with the previous id.
    filled = torch.cummax(torch.where(mask, seg, last_segment[:, None]), dim=1).values
    prev = torch.cat([last_segment[:, None], filled[:, :-1]], dim=1)
    is_new = mask & (seg != prev)
    token_slot = torch.cumsum(is_new.long(), dim=1)
    last_slot = token_slot[:, -1] if T > 0 else torch.zeros(B, dtype=torch.long, device=mask.device)
    num_slots = int(last_slot.max()) + 1 if B > 0 else 1
    ext_len = T + num_slots - 1
    arange = torch.arange(T, device=mask.device)
    token_pos = arange[None, :] + token_slot

    counts = torch.zeros(B, num_slots, device=mask.device)
    counts.scatter_add_(1, token_slot, mask.float())
    counts[:, 0] += pending_count.to(counts.device, counts.dtype)

    # The write of slot j-1 sits just before the first token of slot j: extended position t + j - 1.
    write_pos = torch.full((B, num_slots), ext_len, dtype=torch.long, device=mask.device)
    b_idx, t_idx = is_new.nonzero(as_tuple=True)
    j = token_slot[b_idx, t_idx]
    write_pos[b_idx, j - 1] = t_idx + j - 1
    write_valid = (write_pos < ext_len) & (counts > 0)
    write_pos = torch.where(write_valid, write_pos, torch.full_like(write_pos, ext_len))
    return SegmentPlan(
        mask=mask.float(),
        token_slot=token_slot,
        token_pos=token_pos,
        write_pos=write_pos,
        write_valid=write_valid,
        counts=counts,
        last_slot=last_slot,
        ext_len=ext_len,
        last_segment=filled[:, -1] if T > 0 else last_segment.clone(),
    )


@dataclass
class MessageWritePlan:
    """SSW with the authors' semantics (``ssw_semantics="official"``): the messages written by one forward call.

    Each row's message ids ``≥ 0`` present in the call become slots ``0 … M−1`` in ascending id order; every
    token of a slot is averaged into its one write. Tokens with id −1 (never written) and padding go to the dump
    slot ``M``, which is dropped.

    Attributes:
        token_slot: ``(B, T)`` slot of each token (``M`` for tokens not written).
        counts: ``(B, M)`` float, tokens per slot.
        write_valid: ``(B, M)`` bool, the slot holds a message (rows with fewer messages have empty slots).
    """

    token_slot: Tensor
    counts: Tensor
    write_valid: Tensor

    @property
    def num_slots(self) -> int:
        return self.counts.shape[1]


def plan_message_writes(segment_ids: Tensor, mask: Tensor | None) -> MessageWritePlan | None:
    """Plan the writes of one call under the authors' SSW semantics.

    Args:
        segment_ids: ``(B, T)`` message id of each token, ``≥ 0`` or −1 (never written); any order.
        mask: ``(B, T)`` bool, False for padding (never written); ``None``: no padding.
    Returns:
        The plan, or ``None`` when no token of the whole batch is writable: the authors' code then writes every
        (unpadded) token, as TSW does, and so does the caller.
    Raises:
        ValueError: an id below −1.
    """
    seg = segment_ids.long()
    B, T = seg.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=seg.device)
    if T > 0 and bool((seg < -1).any()):
        raise ValueError("message ids must be >= -1 (-1: never written) with ssw_semantics='official'")
    active = (seg >= 0) & mask
    if not bool(active.any()):
        return None
    span = int(seg.max()) + 2  # ids 0 … max, and `span − 1` for the tokens not written (sorted after every id)
    rows = torch.arange(B, device=seg.device)[:, None]
    keys = rows * span + torch.where(active, seg, torch.full_like(seg, span - 1))
    uniq, inverse = torch.unique(keys, return_inverse=True)  # sorted: by row, then id
    first = torch.searchsorted(uniq, torch.arange(B, device=seg.device) * span)
    slot = inverse - first[:, None]  # rank of the token's id among its row's ids
    num_slots = int((torch.where(active, slot, torch.full_like(slot, -1)).max(dim=1).values + 1).max())
    slot = torch.where(active, slot, torch.full_like(slot, num_slots))
    counts = torch.zeros(B, num_slots + 1, device=seg.device).scatter_add(1, slot, active.float())[:, :num_slots]
    return MessageWritePlan(token_slot=slot, counts=counts, write_valid=counts > 0)
