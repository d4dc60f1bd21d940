"""Reference implementation of the δ-mem gated delta rule: a plain loop over positions.

This file is the readable specification that :mod:`.chunked` and :mod:`.step` are tested against.

For every batch row ``b`` and sub-state ``n`` there is a state ``S ∈ R^{r×r}`` (row index ``i`` = value
dim, column index ``j`` = key dim). At each position ``t`` with ``q_t, k_t ∈ R^r`` (already L2-normalised by
the caller; nothing here normalises), ``v_t ∈ R^r`` and one gate per ROW of ``S``, ``β_t ∈ [0, 1]^r``,
``λ_t = 1 − β_t`` (the paper's coupled rule; a separate ``decay`` tensor gives the decoupled and pure delta
rules, an extension beyond the paper)::

    read:   o_t = S_{t-1} q_t                                   (read BEFORE write)
    write:  S_t = Diag(λ_t) S_{t-1} + Diag(β_t) (v_t − S_{t-1} k_t) k_tᵀ

An optional ``erase`` gate ``ε_t`` (per row) separates the strength of the erase term from that of the write (the
authors' ``state_update_mode="lambda_outside"`` is ``ε = λ ⊙ β``; ``None`` is ``ε = β``, the paper)::

    write:  S_t = Diag(λ_t) S_{t-1} + Diag(β_t) v_t k_tᵀ − Diag(ε_t) (S_{t-1} k_t) k_tᵀ

Where ``mask[b, t]`` is False the position writes nothing (``β_t`` and ``ε_t`` are treated as 0 and ``λ_t`` as
1, so the state is unchanged) but its read ``o_t`` is still computed (the caller ignores it).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["delta_rule_reference"]


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    mask: Tensor | None,
    decay: Tensor | None = None,
    erase: Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Cheap shape/dtype checks shared by the three implementations; returns ``(B, T, N, r)``.

    ``v``, ``beta``, ``decay`` and ``erase`` may have a value width ``dv`` other than the key width ``r`` (the
    state is then ``(B, N, dv, r)``: the wide-value option); the paper's state is square.

    Raises:
        ValueError: on any shape or dtype mismatch.
    """
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, T, N, r), got {tuple(q.shape)}")
    shape = q.shape
    B, T, N, r = shape
    if k.shape != shape:
        raise ValueError(f"k must have the shape of q {tuple(shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != shape[:3]:
        raise ValueError(f"v must have shape (B, T, N, dv) with (B, T, N) = {tuple(shape[:3])}, got {tuple(v.shape)}")
    dv = v.shape[3]
    named = [("k", k), ("v", v), ("beta", beta)]
    named += [(n, x) for n, x in (("decay", decay), ("erase", erase)) if x is not None]
    for name, x in named[2:]:
        if x.shape != v.shape:
            raise ValueError(f"{name} must have the shape of v {tuple(v.shape)}, got {tuple(x.shape)}")
    for name, x in named:
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v, beta must be floating point, got {q.dtype}")
    if initial_state is not None:
        if initial_state.shape != (B, N, dv, r):
            raise ValueError(
                f"initial_state must have shape (B, N, dv, r) = {(B, N, dv, r)}, got {tuple(initial_state.shape)}"
            )
        if initial_state.dtype != q.dtype:
            raise ValueError(f"initial_state must have the dtype of q ({q.dtype}), got {initial_state.dtype}")
    if mask is not None:
        if mask.shape != (B, T):
            raise ValueError(f"mask must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    return B, T, N, r


def delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    mask: Tensor | None = None,
    decay: Tensor | None = None,
    erase: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated delta rule, one position at a time (the specification).

    Args:
        q, k: ``(B, T, N, r)`` read query / write key (L2-normalised by the caller).
        v: ``(B, T, N, dv)`` value written (``dv = r`` in the paper).
        beta: ``(B, T, N, dv)`` per-row write strength in ``[0, 1]``; the decay is ``1 − beta``.
        initial_state: ``(B, N, dv, r)`` state before position 0, or None for zeros.
        mask: ``(B, T)`` bool, False = padding (no write and no decay; its read is still computed), or None.
        decay: ``(B, T, N, dv)`` per-row retention ``λ_t`` in ``[0, 1]``, or None for the coupled ``1 − beta``.
        erase: ``(B, T, N, dv)`` per-row erase gate ``ε_t``, or None for ``beta`` (the paper).

    Returns:
        ``(out, final_state)``: ``out (B, T, N, r)`` with ``out[:, t] = S_{t-1} q_t``, and
        ``final_state (B, N, r, r)``. Both in the dtype of the inputs.
    """
    B, T, N, r = check_inputs(q, k, v, beta, initial_state, mask, decay, erase)
    S = q.new_zeros(B, N, v.shape[-1], r) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        q_t, k_t, v_t, b_t = q[:, t], k[:, t], v[:, t], beta[:, t]  # (B, N, r)
        l_t = 1 - b_t if decay is None else decay[:, t]
        e_t = b_t if erase is None else erase[:, t]
        if mask is not None:
            b_t = torch.where(mask[:, t, None, None], b_t, torch.zeros_like(b_t))
            e_t = torch.where(mask[:, t, None, None], e_t, torch.zeros_like(e_t))
            l_t = torch.where(mask[:, t, None, None], l_t, torch.ones_like(l_t))
        outs.append(torch.einsum("bnij,bnj->bni", S, q_t))  # read before write
        Sk = torch.einsum("bnij,bnj->bni", S, k_t)
        # (Diag(β_t) v_t − Diag(ε_t) S k_t) k_tᵀ; the paper's ε = β keeps its factored form
        e = b_t * (v_t - Sk) if erase is None else b_t * v_t - e_t * Sk
        write = e[..., :, None] * k_t[..., None, :]
        S = l_t[..., :, None] * S + write  # Diag(λ_t) scales row i of S
    out = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, N, v.shape[-1])
    return out, S
