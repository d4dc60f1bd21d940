"""Chunked delta rule with **one gate per sub-state** shared by all rows of the state (the wide-value option).

Same recurrence as :func:`.reference.delta_rule_reference` with ``beta`` and ``decay`` constant along the value
rows: ``S_t = λ_t S_{t-1} + β_t (v_t − S_{t-1} k_t) k_tᵀ`` with ``S ∈ R^{dv×r}`` and scalars ``β_t, λ_t``. The
derivation of :mod:`.chunked` holds row by row; because the gates are shared, every quantity that depends only
on keys, queries and gates (the decay matrix ``D``, ``A``, ``P``, ``W = (I + A)^{-1}``, ``M``) is one ``C×C`` or
``r×r`` matrix per chunk instead of one per row, and the rows enter only as the columns of matrix right-hand
sides::

    [U, Wk] = W [β ⊙ V, Diag(β ⊙ γ_{t-1}) K]        (C × dv and C × r)
    O       = P U + (Diag(γ_{t-1}) Q − P Wk) S_0ᵀ     (reads of the chunk, C × dv)
    S_Cᵀ    = (γ_C I − Kᵀ Diag(g) Wk) S_0ᵀ + Kᵀ (g ⊙ U)

The general per-row form costs ``dv·C²`` per chunk and sub-state for ``D`` alone; this one ``C² + C·dv``. Tested
against the reference (expanded gates) on outputs, final state and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["delta_rule_chunked_shared_gate"]


def delta_rule_chunked_shared_gate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    chunk_size: int = 64,
    decay: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Delta rule over a sequence with per-sub-state gates.

    Args:
        q, k: ``(B, T, N, r)`` read query / write key (L2-normalised by the caller).
        v: ``(B, T, N, dv)`` values. beta: ``(B, T, N)`` write strength in ``[0, 1]``.
        initial_state: ``(B, N, dv, r)`` or None for zeros. mask: ``(B, T)`` bool (False: no write, no decay).
        decay: ``(B, T, N)`` retention ``λ`` in ``[0, 1]``, or None for the coupled ``1 − beta``.

    Returns:
        ``(out (B, T, N, dv), final_state (B, N, dv, r))`` with ``out[:, t] = S_{t-1} q_t``.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape (B, T, N, r), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, T, N, r = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, N):
        raise ValueError(f"v must have shape (B, T, N, dv) with (B, T, N) = {(B, T, N)}, got {tuple(v.shape)}")
    dv = v.shape[3]
    for name, x in (("beta", beta), ("decay", decay)):
        if x is not None and x.shape != (B, T, N):
            raise ValueError(f"{name} must have shape (B, T, N) = {(B, T, N)}, got {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v), ("beta", beta), ("decay", decay), ("initial_state", initial_state)):
        if x is not None and x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    if initial_state is not None and initial_state.shape != (B, N, dv, r):
        raise ValueError(f"initial_state must have shape (B, N, dv, r) = {(B, N, dv, r)}, got {tuple(initial_state.shape)}")
    if mask is not None and (mask.shape != (B, T) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape (B, T) = {(B, T)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    St = (q.new_zeros(B, N, r, dv) if initial_state is None else initial_state.mT)  # the state transposed: (r, dv)
    if T == 0:
        return q.new_zeros(B, 0, N, dv), St.mT.contiguous()

    eps = torch.finfo(q.dtype).eps
    if decay is None:
        lc = torch.log1p(-beta.clamp_max(1.0 - eps / 2))
    else:
        lc = torch.log(decay.clamp_min(torch.finfo(q.dtype).tiny))
    if mask is not None:
        beta = beta.masked_fill(~mask[:, :, None], 0.0)
        lc = lc.masked_fill(~mask[:, :, None], 0.0)
    C = min(chunk_size, T)
    nC = -(-T // C)
    pad = nC * C - T
    if pad:  # padded positions: β = 0, λ = 1 (identity updates)
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta, lc = F.pad(beta, (0, 0, 0, pad)), F.pad(lc, (0, 0, 0, pad))

    # Layouts (nC, B, N, C, ·): one C×C system per chunk and sub-state.
    Q = q.reshape(B, nC, C, N, r).permute(1, 0, 3, 2, 4)
    K = k.reshape(B, nC, C, N, r).permute(1, 0, 3, 2, 4)
    V = v.reshape(B, nC, C, N, dv).permute(1, 0, 3, 2, 4)
    b = beta.reshape(B, nC, C, N).permute(1, 0, 3, 2)
    L = lc.reshape(B, nC, C, N).permute(1, 0, 3, 2).cumsum(-1)  # log γ_t (inclusive)
    Lx = F.pad(L[..., :-1], (1, 0))  # log γ_{t-1}
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    D = (Lx[..., :, None] - L[..., None, :]).masked_fill(~strict, float("-inf")).exp()  # (nC,B,N,C,C)
    A = D * (K @ K.mT) * b[..., :, None]
    P = D * (Q @ K.mT)
    gx = Lx.exp()
    rhs = torch.cat((b[..., None] * V, (b * gx)[..., None] * K), dim=-1)  # (nC,B,N,C,dv+r)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    PX = P @ X
    Qeff = gx[..., None] * Q - PX[..., dv:]  # (nC,B,N,C,r)
    g = (L[..., -1:] - L).exp()  # γ_C / γ_j
    G = K.mT @ (g[..., None] * X)  # (nC,B,N,r,dv+r): [H, Kᵀ Diag(g) Wk]
    eye = torch.eye(r, dtype=q.dtype, device=q.device)
    M = eye * L[..., -1:, None].exp() - G[..., dv:]  # (nC,B,N,r,r)
    H = G[..., :dv]

    starts = []
    for c in range(nC):  # the only sequential part
        starts.append(St)
        St = torch.baddbmm(H[c].reshape(B * N, r, dv), M[c].reshape(B * N, r, r), St.reshape(B * N, r, dv))
        St = St.view(B, N, r, dv)
    S0 = torch.stack(starts)  # (nC,B,N,r,dv)
    out = PX[..., :dv] + Qeff @ S0  # (nC,B,N,C,dv)
    out = out.permute(1, 0, 3, 2, 4).reshape(B, nC * C, N, dv)
    return out[:, :T], St.mT.contiguous()  # the state layout every other path uses (B, N, dv, r)
