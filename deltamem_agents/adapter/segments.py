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

Host syncs: reading a tensor's value on the host (``bool(t.any())``, ``int(t.max())``, ``nonzero``) costs nothing
on the CPU and a device sync on a GPU. Our semantics plans without one where the tensors live on a GPU: the number
of message slots is bounded statically (``T + 1``; or from the ids when they are given as a CPU tensor) rather than
counted, the writes are placed by a scatter, and the ids are validated only when the plan is made on the CPU
(where checking is free) — ids given on a GPU are trusted. The authors' semantics has data-dependent message sets,
so its plan is made on the host: one device-to-host copy per call when the ids live on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MessageWritePlan", "SegmentPlan", "auto_segment_ids", "plan_message_writes", "plan_segments"]


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether reading tensor values on the host costs no device sync (the tensors live on the CPU)."""
    return device.type == "cpu"


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
    """Plan the SSW writes of one forward call (no host sync when the tensors live on a GPU; see the module
    docstring).

    Args:
        segment_ids: ``(B, T)`` int message id of each token, non-decreasing along each row over unmasked tokens
            and ``>= last_segment`` (equal continues the open message); ``None``: every token its own message.
            Checked (``ValueError``) when the plan is made on the CPU.
        mask: ``(B, T)`` bool, False for padding; ``None``: no padding.
        last_segment: ``(B,)`` id of the message left open by the previous call (``-1``: none).
        pending_count: ``(B,)`` tokens already in that open message.
    """
    if mask is None:
        B, T = (segment_ids.shape if segment_ids is not None else (last_segment.shape[0], 0))
        mask = torch.ones(B, T, dtype=torch.bool, device=last_segment.device)
    B, T = mask.shape
    device = mask.device
    on_host = _host_reads_are_free(device)
    if segment_ids is None:
        seg = auto_segment_ids(mask, last_segment)
    else:
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids must have shape {(B, T)}, got {tuple(segment_ids.shape)}")
        seg = segment_ids.to(device=device, dtype=torch.long)
        if on_host:
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
    last_slot = token_slot[:, -1] if T > 0 else torch.zeros(B, dtype=torch.long, device=device)
    num_slots = _slot_bound(segment_ids, last_slot, T, on_host)
    ext_len = T + num_slots - 1
    arange = torch.arange(T, device=device)
    token_pos = arange[None, :] + token_slot

    counts = torch.zeros(B, num_slots, device=device, dtype=torch.float32)
    counts.scatter_add_(1, token_slot, mask.float())
    counts[:, 0] += pending_count.to(device, torch.float32)

    # The write of slot j-1 sits just before the first token of slot j: extended position t + j - 1. A scatter
    # (not nonzero(), whose output size is data-dependent: a sync) into one extra column that takes every token
    # which starts no message; amin keeps it deterministic where several land.
    target = torch.where(is_new, token_slot - 1, torch.full_like(token_slot, num_slots))
    write_pos = torch.full((B, num_slots + 1), ext_len, dtype=torch.long, device=device)
    write_pos = write_pos.scatter_reduce(1, target, arange[None, :] + token_slot - 1, reduce="amin")[:, :num_slots]
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


def _slot_bound(segment_ids: Tensor | None, last_slot: Tensor, T: int, on_host: bool) -> int:
    """Message slots of the call: exact on the CPU; otherwise an upper bound read without a device sync. Extra
    slots stay empty (never written), so the plan means the same."""
    if T == 0 or last_slot.shape[0] == 0:
        return 1
    if on_host:
        return int(last_slot.max()) + 1
    if segment_ids is not None and segment_ids.device.type == "cpu":
        # every new message but the first needs an id change between neighbouring positions (padding may add
        # changes, never remove one): 1 open slot + 1 + changes
        changes = int((segment_ids[:, 1:] != segment_ids[:, :-1]).sum(1).max()) if T > 1 else 0
        return min(T + 1, changes + 2)
    return T + 1


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


def plan_message_writes(
    segment_ids: Tensor, mask: Tensor | None, *, device: torch.device | str | None = None
) -> MessageWritePlan | None:
    """Plan the writes of one call under the authors' SSW semantics.

    The plan is computed on the host (the messages present and their number decide shapes and whether there is a
    plan at all): ids and mask living on a GPU are copied to the host in one transfer (one sync per call), and
    the plan's tensors go to ``device``.

    Args:
        segment_ids: ``(B, T)`` message id of each token, ``≥ 0`` or −1 (never written); any order.
        mask: ``(B, T)`` bool, False for padding (never written); ``None``: no padding.
        device: where the plan's tensors go (default: the ids' device).
    Returns:
        The plan, or ``None`` when no token of the whole batch is writable: the authors' code then writes every
        (unpadded) token, as TSW does, and so does the caller.
    Raises:
        ValueError: an id below −1.
    """
    device = torch.device(device) if device is not None else segment_ids.device
    B, T = segment_ids.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    if segment_ids.device == mask.device:  # one transfer (a no-op on the CPU)
        seg, valid = torch.stack([segment_ids.long(), mask.long()]).cpu().unbind(0)
    else:
        seg, valid = segment_ids.long().cpu(), mask.long().cpu()
    if T > 0 and bool((seg < -1).any()):
        raise ValueError("message ids must be >= -1 (-1: never written) with ssw_semantics='official'")
    active = (seg >= 0) & valid.bool()
    if not bool(active.any()):
        return None
    span = int(seg.max()) + 2  # ids 0 … max, and `span − 1` for the tokens not written (sorted after every id)
    rows = torch.arange(B)[:, None]
    keys = rows * span + torch.where(active, seg, torch.full_like(seg, span - 1))
    uniq, inverse = torch.unique(keys, return_inverse=True)  # sorted: by row, then id
    first = torch.searchsorted(uniq, torch.arange(B) * span)
    slot = inverse - first[:, None]  # rank of the token's id among its row's ids
    num_slots = int((torch.where(active, slot, torch.full_like(slot, -1)).max(dim=1).values + 1).max())
    slot = torch.where(active, slot, torch.full_like(slot, num_slots))
    counts = torch.zeros(B, num_slots + 1, dtype=torch.float32).scatter_add(1, slot, active.float())[:, :num_slots]
    return MessageWritePlan(token_slot=slot.to(device), counts=counts.to(device), write_valid=(counts > 0).to(device))
