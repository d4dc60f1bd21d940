"""Chunked parallel form of the gated delta rule (prefill and training).

Same contract and math as :func:`.reference.delta_rule_reference`; no per-token Python loop, differentiable by
autograd. Only the carry of the state from one chunk to the next is sequential (one ``baddbmm`` per chunk).

Derivation
----------
Every row ``i`` of ``S`` evolves independently (key dim ``r``, value dim 1). Writing ``s_t`` for that row,
``c_t = 1 − β_t`` and ``e_t = β_t (v_t − s_{t-1}·k_t)`` (scalars for the row)::

    s_t = c_t s_{t-1} + e_t k_tᵀ

Inside a chunk of length ``C`` that starts from ``s_0``, with ``γ_t = Π_{m≤t} c_m`` (``γ_0 = 1``) and the
decay between positions ``D[t, j] = γ_{t-1} / γ_j`` for ``j < t`` (0 otherwise)::

    s_{t-1} = γ_{t-1} s_0 + Σ_{j<t} D[t, j] e_j k_jᵀ
    (I + A) e = β ⊙ v − β ⊙ γ_{t-1} ⊙ (K s_0ᵀ)          A[t, j] = β_t D[t, j] (k_t·k_j)   (strictly lower)

so with ``W = (I + A)^{-1}`` (a unit-lower-triangular solve), ``U = W (β ⊙ v)`` and
``Wk = W Diag(β ⊙ γ_{t-1}) K`` we get ``e = U − Wk s_0ᵀ``. Substituting:

* reads:      ``o = P U + (Diag(γ_{t-1}) Q − P Wk) s_0ᵀ``   with ``P[t, j] = D[t, j] (q_t·k_j)``
* chunk end:  ``s_C = M s_0 + h`` with ``M = γ_C I − Kᵀ Diag(g) Wk``, ``h = Kᵀ (g ⊙ U)``, ``g_j = γ_C / γ_j``

With a separate erase gate ``ε`` (``e_t = β_t v_t − ε_t s_{t-1}·k_t``; the authors' ``lambda_outside`` mode)
the same steps give ``A[t, j] = ε_t D[t, j] (k_t·k_j)`` and ``Wk = W Diag(ε ⊙ γ_{t-1}) K``; ``U`` is unchanged.

Everything except ``s_0`` is computed for all chunks at once; the carry ``s ← M_c s + h_c`` is the only
loop, and the reads of all chunks are one batched ``baddbmm`` afterwards.

Numerics
--------
Decay ratios are ``exp(L_a − L_b)`` of in-chunk cumulative sums ``L`` of ``log c``; entries with ``a < b``
(positive exponents, possibly huge) are replaced by ``−inf`` BEFORE the ``exp`` so nothing overflows and no
``0·inf`` appears in the backward pass. ``c = 1 − β`` is exactly 0 when ``β == 1`` (``log c = −inf`` and
``inf − inf = NaN`` in the differences), so ``β`` is clamped to ``1 − eps/2`` (the largest value below 1 of the
dtype) before ``log1p(−β)``: no representable ``β < 1`` is changed, and ``β == 1`` behaves as a decay of
``eps/2``, i.e. a relative change at rounding level. This clamp is deliberately much milder than a clamp of
``log c`` at e.g. ``−1e4``: such a huge value would enter the running sums, whose float32 resolution near
``1e4`` is ``≈1e-3``, and every later decay ratio in that chunk would lose three digits. Clamping ``β`` rather
than ``log c`` also keeps the backward pass finite (``log1p`` is never differentiated at ``−1``). The one
consequence: at ``β`` exactly 1 the gradient w.r.t. that ``β`` misses its (decay) term through ``c`` — irrelevant
when ``β = sigmoid(·)``, whose derivative is exactly 0 there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import check_inputs

__all__ = ["delta_rule_chunked"]


def delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    chunk_size: int = 64,
    decay: Tensor | None = None,
    erase: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated delta rule over a whole sequence, in chunks of ``chunk_size`` positions.

    Args:
        q, k: ``(B, T, N, r)`` read query / write key (L2-normalised by the caller).
        v: ``(B, T, N, r)`` value written.
        beta: ``(B, T, N, r)`` per-row write strength in ``[0, 1]``; the decay is ``1 − beta``.
        initial_state: ``(B, N, r, r)`` state before position 0, or None for zeros.
        mask: ``(B, T)`` bool, False = padding (no write; its read is still computed), or None for all True.
        decay: ``(B, T, N, r)`` retention ``λ`` in ``[0, 1]`` (decoupled/delta rules, beyond the paper), or None
            for the coupled ``1 − beta``. The derivation above holds with ``c_t = λ_t`` unchanged.
        erase: ``(B, T, N, r)`` erase gate ``ε`` (see the module docstring), or None for ``beta`` (the paper).
        chunk_size: positions per chunk (``T`` is padded up to a multiple with no-op positions). Memory and
            work per position grow with ``N · r · chunk_size``; the sequential loop has ``T / chunk_size`` steps.

    Returns:
        ``(out, final_state)``: ``out (B, T, N, r)`` with ``out[:, t] = S_{t-1} q_t``, and
        ``final_state (B, N, r, r)``. Both in the dtype of the inputs.
    """
    B, T, N, r = check_inputs(q, k, v, beta, initial_state, mask, decay, erase)
    dv = v.shape[-1]  # rows of the state (= r in the paper; the hidden size for wide values)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    s = q.new_zeros(B, N, dv, r) if initial_state is None else initial_state
    if T == 0:
        return q.new_zeros(B, 0, N, dv), s

    C = min(chunk_size, T)
    nC = -(-T // C)
    pad = nC * C - T
    if mask is not None:
        beta = beta.masked_fill(~mask[:, :, None, None], 0.0)
        if decay is not None:
            decay = decay.masked_fill(~mask[:, :, None, None], 1.0)
        if erase is not None:
            erase = erase.masked_fill(~mask[:, :, None, None], 0.0)
    if pad:  # padded positions have beta = erase = 0 (and decay 1): identity updates
        q, k, v, beta = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, beta))
        if decay is not None:
            decay = F.pad(decay, (0, 0, 0, 0, 0, pad), value=1.0)
        if erase is not None:
            erase = F.pad(erase, (0, 0, 0, 0, 0, pad))

    # Layouts: shared by the r rows of a sub-state -> (nC, B, N, 1, C, r); per row -> (nC, B, N, r, C).
    Q = q.reshape(B, nC, C, N, r).permute(1, 0, 3, 2, 4).unsqueeze(3)
    K = k.reshape(B, nC, C, N, r).permute(1, 0, 3, 2, 4).unsqueeze(3)
    b = beta.reshape(B, nC, C, N, dv).permute(1, 0, 3, 4, 2)
    vb = v.reshape(B, nC, C, N, dv).permute(1, 0, 3, 4, 2) * b  # β ⊙ v
    eb = b if erase is None else erase.reshape(B, nC, C, N, dv).permute(1, 0, 3, 4, 2)  # ε

    # Log-decays (see "Numerics" in the module docstring for the clamp; a separate decay is clamped the same way
    # away from 0, so log(0) = −inf never enters the running sums).
    if decay is None:
        lc = torch.log1p(-b.clamp_max(1.0 - torch.finfo(b.dtype).eps / 2))
    else:
        lam = decay.reshape(B, nC, C, N, dv).permute(1, 0, 3, 4, 2)
        lc = torch.log(lam.clamp_min(torch.finfo(b.dtype).tiny))
    L = lc.cumsum(-1)  # log γ_t (inclusive)
    Lx = F.pad(L[..., :-1], (1, 0))  # log γ_{t-1} (exclusive)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)  # [t, j]: j < t
    D = (Lx[..., :, None] - L[..., None, :]).masked_fill(~strict, float("-inf")).exp()  # (nC,B,N,dv,C,C)

    KQ = torch.cat((K, Q), dim=-2) @ K.mT  # (nC,B,N,1,2C,C): [k_t·k_j ; q_t·k_j]
    A = D * KQ[..., :C, :] * eb[..., :, None]
    P = D * KQ[..., C:, :]

    gx = Lx.exp()  # γ_{t-1}
    rhs = torch.cat((vb[..., None], (eb * gx)[..., None] * K), dim=-1)  # (nC,B,N,dv,C,1+r)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # [U, Wk]; diag(A)=0 ignored
    PX = P @ X
    Qeff = gx[..., None] * Q - PX[..., 1:]  # (nC,B,N,dv,C,r)

    g = (L[..., -1:] - L).exp()  # γ_C / γ_j
    G = K.mT @ (g[..., None] * X)  # (nC,B,N,dv,r,1+r): [h, Kᵀ Diag(g) Wk]
    eye = torch.eye(r, dtype=q.dtype, device=q.device)
    M = eye * L[..., -1:, None].exp() - G[..., 1:]  # (nC,B,N,dv,r,r)

    R = B * N * dv
    M = M.reshape(nC, R, r, r)
    h = G[..., :1].reshape(nC, R, r, 1)
    s = s.reshape(R, r, 1)
    starts = []
    for c in range(nC):  # the only sequential part: carry the state across chunks
        starts.append(s)
        s = torch.baddbmm(h[c], M[c], s)
    S0 = torch.stack(starts).reshape(nC * R, r, 1)
    out = torch.baddbmm(PX[..., :1].reshape(nC * R, C, 1), Qeff.reshape(nC * R, C, r), S0)
    out = out.reshape(nC, B, N, dv, C).permute(1, 0, 4, 2, 3).reshape(B, nC * C, N, dv)
    return out[:, :T], s.reshape(B, N, dv, r)
