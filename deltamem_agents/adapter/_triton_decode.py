"""Fused Triton decode step of δ-mem: activations, read and write of one position per row in one kernel; private to
the layer (it takes the layer's raw fused projections and gate bias, not the ops' ``(q, k, v, β)`` contract).

The decode hot path runs once per layer per generated token. In torch it is the projection, ~8 activation ops
(tanh, L2 norm, sigmoid, the split) and the 6 ops of :func:`~deltamem_agents.ops.delta_rule_step`; on a GPU each is a launch of
a few microseconds for a handful of numbers. Here the projection ``p = x W_inᵀ`` stays a torch GEMM (cuBLAS does
it best) and everything after it is one kernel, one program per (row, sub-state)::

    q = l2norm(tanh(p_q)), k = l2norm(tanh(p_k))      (per sub-state; skipped with normalize_qk=False)
    v = p_v,  β = σ(p_β + b_β),  λ = 1 − β or the given decay
    out = S q                                         (read BEFORE the write)
    S ← Diag(keep) S − Diag(erase)(S k) kᵀ + Diag(write) v kᵀ   (skipped where the mask is False)

with ``(keep, erase, write)`` by ``update``: ``"standard"`` ``(λ, β, β)`` (the paper's coupled rule when no decay is
given), ``"lambda_outside"`` ``(λ, λβ, β)``, ``"no_lambda"`` ``(1, β, β)`` — the authors' ``state_update_mode``
values. Same math as :mod:`._cpu_kernel` (tested against it and against
:func:`~deltamem_agents.ops.delta_rule_reference`).

CUDA-graph friendly: fixed shapes, no host syncs (only metadata is checked, nothing reads a tensor's value on the
host), no data-dependent Python branches; the new state can be written into a preallocated ``state_out`` — also
``state`` itself (each program loads its whole sub-state before storing it, and no two programs share one), so a
captured graph can keep the state in one static buffer. Inference only (no autograd): training takes the
differentiable :func:`~deltamem_agents.ops.triton_scan.delta_rule_triton` (which handles ``T = 1`` in one launch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.triton_support import AVAILABLE, check_device, jit, next_power_of_2, tl

__all__ = ["UPDATE_MODES", "delta_rule_decode_triton"]

UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
L2_EPS = 1e-6


if AVAILABLE:

    def _decode_step(p_ptr, bias_ptr, decay_ptr, state_ptr, out_state_ptr, reads_ptr, mask_ptr, N, R, eps,
                     UPDATE: tl.constexpr, HAS_DECAY: tl.constexpr, NORMALIZE_QK: tl.constexpr,
                     HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        bn = tl.program_id(0).to(tl.int64)
        b = bn // N
        n = bn % N
        a = tl.arange(0, BLOCK)
        ok = a < R
        ok2 = ok[:, None] & ok[None, :]
        tile = a[:, None] * R + a[None, :]
        W = N * R
        base = b * 4 * W + n * R
        qh = tl.load(p_ptr + base + a, mask=ok, other=0.0).to(tl.float32)
        kh = tl.load(p_ptr + base + W + a, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(p_ptr + base + 2 * W + a, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(p_ptr + base + 3 * W + a, mask=ok, other=0.0).to(tl.float32)
        z = z + tl.load(bias_ptr + n * R + a, mask=ok, other=0.0).to(tl.float32)
        if NORMALIZE_QK:
            # tanh(x) = 1 − 2 / (e^{2x} + 1): exact limits at ±inf; absolute error ~1e-7 near 0 (then normalised)
            q = tl.where(ok, 1.0 - 2.0 / (tl.exp(2.0 * qh) + 1.0), 0.0)
            kv = tl.where(ok, 1.0 - 2.0 / (tl.exp(2.0 * kh) + 1.0), 0.0)
            q = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=0)), eps)
            kv = kv / tl.maximum(tl.sqrt(tl.sum(kv * kv, axis=0)), eps)
        else:
            q = qh
            kv = kh
        beta = 1.0 / (1.0 + tl.exp(-z))
        if HAS_DECAY:
            lam = tl.load(decay_ptr + b * W + n * R + a, mask=ok, other=1.0).to(tl.float32)
        else:
            lam = 1.0 - beta
        if UPDATE == 0:
            keep = lam
            erase = beta
        elif UPDATE == 1:
            keep = lam
            erase = lam * beta
        else:
            keep = tl.full((BLOCK,), 1.0, tl.float32)
            erase = beta
        write = beta
        if HAS_MASK:
            valid = tl.load(mask_ptr + b) != 0
            keep = tl.where(valid, keep, 1.0)
            erase = tl.where(valid, erase, 0.0)
            write = tl.where(valid, write, 0.0)
        S = tl.load(state_ptr + bn * R * R + tile, mask=ok2, other=0.0).to(tl.float32)
        tl.store(reads_ptr + b * W + n * R + a, tl.sum(S * q[None, :], axis=1), mask=ok)
        Sk = tl.sum(S * kv[None, :], axis=1)
        S = keep[:, None] * S + (write * v - erase * Sk)[:, None] * kv[None, :]
        tl.store(out_state_ptr + bn * R * R + tile, S, mask=ok2)


def delta_rule_decode_triton(
    p: Tensor,
    beta_bias: Tensor,
    state: Tensor,
    mask: Tensor | None = None,
    *,
    num_states: int,
    rank: int,
    decay: Tensor | None = None,
    update: str = "standard",
    normalize_qk: bool = True,
    state_out: Tensor | None = None,
    reads_out: Tensor | None = None,
    eps: float = L2_EPS,
) -> tuple[Tensor, Tensor]:
    """One decode position per row: activations + read + write in one kernel (no autograd).

    Args:
        p: ``(B, 4·N·r)`` or ``(B, 1, 4·N·r)`` raw memory projections ``[q̂; k̂; v; b̂]`` (float32, bf16 or fp16;
            read as float32), contiguous.
        beta_bias: ``(N·r,)`` write-gate bias ``b_β``.
        state: ``(B, N, r, r)`` float32 state before this position.
        mask: ``(B,)`` or ``(B, 1)`` bool, False = this row writes nothing (its read is still computed), or None.
        decay: ``(B, N·r)`` retention ``λ`` already activated (decoupled rules), or None for ``1 − β``.
        update: ``"standard"``, ``"lambda_outside"`` or ``"no_lambda"`` (see the module docstring).
        normalize_qk: apply ``l2norm(tanh(·))`` to ``q̂`` and ``k̂`` (the paper's and the authors' default).
        state_out: ``(B, N, r, r)`` float32 buffer for the new state (may be ``state``: updated in place), or None
            for a new tensor.
        reads_out: ``(B, N·r)`` float32 buffer for the reads, or None for a new tensor.

    Returns:
        ``(reads (B, N·r) float32, new_state (B, N, r, r) float32)``.

    Raises:
        ValueError: bad shapes/dtypes/options. TritonUnavailableError: no Triton, or CPU without the interpreter.
    """
    N, R = num_states, rank
    if update not in UPDATE_MODES:
        raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
    if update == "no_lambda" and decay is not None:
        raise ValueError("update 'no_lambda' keeps the state (λ = 1): a decay makes no sense with it")
    if p.dim() == 3:
        if p.shape[1] != 1:
            raise ValueError(f"the decode step takes one position per row, got p of shape {tuple(p.shape)}")
        p = p.view(p.shape[0], p.shape[2])
    B = p.shape[0]
    if p.dim() != 2 or p.shape[1] != 4 * N * R:
        raise ValueError(f"p must have shape (B, 4·N·r) = (B, {4 * N * R}), got {tuple(p.shape)}")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"p must be float32, bfloat16 or float16, got {p.dtype}")
    if not p.is_contiguous():
        raise ValueError("p must be contiguous")
    if R > 64:
        raise ValueError(f"the Triton decode kernel supports r <= 64, got r = {R}")
    if tuple(beta_bias.shape) != (N * R,):
        raise ValueError(f"beta_bias must have shape ({N * R},), got {tuple(beta_bias.shape)}")
    for name, s in (("state", state), ("state_out", state_out)):
        if s is not None and (tuple(s.shape) != (B, N, R, R) or s.dtype != torch.float32 or not s.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {(B, N, R, R)}, "
                             f"got {s.dtype} {tuple(s.shape)}")
    if reads_out is not None and (tuple(reads_out.shape) != (B, N * R) or reads_out.dtype != torch.float32
                                  or not reads_out.is_contiguous()):
        raise ValueError(f"reads_out must be a contiguous float32 tensor of shape {(B, N * R)}")
    if decay is not None and (tuple(decay.shape) != (B, N * R) or not decay.is_contiguous()):
        raise ValueError(f"decay must be a contiguous tensor of shape {(B, N * R)}, got {tuple(decay.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool or mask.numel() != B or mask.dim() not in (1, 2):
            raise ValueError(f"mask must be a bool tensor of shape (B,) or (B, 1) with B = {B}")
        mask = mask.reshape(B).contiguous()
    check_device(p, beta_bias, state, mask, decay, state_out, reads_out)
    out_state = state_out if state_out is not None else torch.empty_like(state)
    reads = reads_out if reads_out is not None else torch.empty(B, N * R, device=p.device, dtype=torch.float32)
    jit(_decode_step)[(B * N,)](
        p, beta_bias.contiguous(), decay if decay is not None else p, state, out_state, reads,
        mask.view(torch.int8) if mask is not None else p, N, R, eps,
        UPDATE=UPDATE_MODES.index(update), HAS_DECAY=decay is not None, NORMALIZE_QK=bool(normalize_qk),
        HAS_MASK=mask is not None, BLOCK=next_power_of_2(R), num_warps=1,  # one r × r tile: one warp
    )
    return reads, out_state
