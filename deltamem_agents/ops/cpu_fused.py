"""Fused CPU kernel of the δ-mem token write (inference only), compiled with numba.

Why: on a CPU the δ-mem arithmetic is tiny (an 8×8 state per layer) and its cost is almost entirely the number
of eager torch dispatches — the activations (tanh, L2 norm, sigmoid) and the chunked scan are ~40 small ops per
layer per call. This kernel does all of it in one compiled loop over positions: for every sequence ``b``,
sub-state ``n`` and position ``t``

    q = l2norm(tanh(p_q)),  k = l2norm(tanh(p_k)),  v = p_v,  β = σ(p_β + b_β)
    out_t = S q                                   (read the old state)
    S ← Diag(1 − β) S + Diag(β) (v − S k) kᵀ       (write, skipped where the mask is False)

It also covers the authors' options that need no extra weights (``rule``, see :func:`kernel_rule`): the pure
delta rule (λ = 1; their ``no_lambda``), their ``lambda_outside`` erase (``S ← Diag(λ)(S − Diag(β) S k kᵀ) +
Diag(β) v kᵀ`` with λ = 1 − β), and raw queries/keys (``normalize_qk=False``: no tanh, no L2 norm). A retention
with its own projection (``decoupled``) is not covered: :func:`kernel_rule` returns None and the torch paths run.

It has no autograd: :class:`~deltamem_agents.adapter.layer.DeltaMemLayer` uses it only when no gradient is
needed, on float32 CPU tensors, and otherwise falls back to :func:`.chunked.delta_rule_chunked` /
:func:`.step.delta_rule_step`. The plain reference it is tested against is :func:`.reference.delta_rule_reference`
(after the same activations). ``nogil=True`` lets sessions on different threads run their scans in parallel.

numba is optional: :data:`AVAILABLE` is False when it is not installed (or ``DELTAMEM_KERNEL=torch``), and the
torch paths are used.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

try:  # optional dependency
    import numba

    AVAILABLE = os.environ.get("DELTAMEM_KERNEL", "auto").strip().lower() != "torch"
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None
    AVAILABLE = False

__all__ = [
    "AVAILABLE",
    "RULE_COUPLED",
    "RULE_DELTA",
    "RULE_LAMBDA_OUTSIDE",
    "decode_write_steer_",
    "delta_rule_fused_cpu",
    "delta_rule_numba",
    "fused_write_unchecked",
    "kernel_rule",
]

L2_EPS = 1e-6
#: Update rules the compiled kernels implement (``rule`` argument): λ = 1 − β and ε = β (the paper); λ = 1 − β and
#: ε = λ β (the authors' ``lambda_outside``); λ = 1 and ε = β (the pure delta rule, the authors' ``no_lambda``).
RULE_COUPLED, RULE_LAMBDA_OUTSIDE, RULE_DELTA = 0, 1, 2


def kernel_rule(update_rule: str, state_update_mode: str = "standard") -> int | None:
    """The ``rule`` code of the compiled kernels for a :class:`~deltamem_agents.adapter.DeltaMemConfig`'s
    ``update_rule`` / ``state_update_mode``, or None when the kernels do not cover it (``decoupled``: the torch
    paths run). With λ = 1, ``lambda_outside`` is the same rule as ``standard``."""
    if update_rule == "delta":
        return RULE_DELTA
    if update_rule != "coupled":
        return None
    return RULE_LAMBDA_OUTSIDE if state_update_mode == "lambda_outside" else RULE_COUPLED

if numba is not None:

    @numba.njit(cache=True, nogil=True, fastmath=False, inline="always")
    def _position(p, bias, state, out, q, k, num_states, rank, eps, write, rule, normalize):  # pragma: no cover
        # One position of one sequence, shared by both kernels: p (4·N·r,) raw projections [q̂; k̂; v; b̂];
        # state (N, r, r) updated in place; out (N·r,) reads; q, k (r,) scratch; rule: RULE_* code;
        # normalize: tanh + L2 norm of q and k (False: the raw projections).
        width = num_states * rank
        for n in range(num_states):
            base = n * rank
            if normalize:
                sq = np.float32(0.0)
                sk = np.float32(0.0)
                for j in range(rank):
                    qj = math.tanh(p[base + j])
                    kj = math.tanh(p[width + base + j])
                    q[j] = qj
                    k[j] = kj
                    sq += qj * qj
                    sk += kj * kj
                nq = max(math.sqrt(sq), eps)
                nk = max(math.sqrt(sk), eps)
                for j in range(rank):
                    q[j] = q[j] / nq
                    k[j] = k[j] / nk
            else:
                for j in range(rank):
                    q[j] = p[base + j]
                    k[j] = p[width + base + j]
            for i in range(rank):
                acc_q = np.float32(0.0)
                acc_k = np.float32(0.0)
                for j in range(rank):
                    s = state[n, i, j]
                    acc_q += s * q[j]
                    acc_k += s * k[j]
                out[base + i] = acc_q
                if write:
                    z = p[3 * width + base + i] + bias[base + i]
                    beta = 1.0 / (1.0 + math.exp(-z))
                    keep = 1.0 if rule == 2 else 1.0 - beta
                    if rule == 1:  # lambda_outside: the erase is scaled by λ too
                        e = beta * p[2 * width + base + i] - keep * beta * acc_k
                    else:
                        e = beta * (p[2 * width + base + i] - acc_k)
                    for j in range(rank):
                        state[n, i, j] = keep * state[n, i, j] + e * k[j]

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def _fused_kernel(p, bias, state, mask, out, num_states, rank, eps, has_mask, rule,
                      normalize):  # pragma: no cover - compiled
        # p: (B, T, 4·N·r) float32 raw projections; bias: (N·r,); state: (B, N, r, r) in/out;
        # mask: (B, T) bool; out: (B, T, N·r) reads.
        B, T, _ = p.shape
        q = np.empty(rank, dtype=np.float32)
        k = np.empty(rank, dtype=np.float32)
        for b in range(B):
            for t in range(T):
                write = (not has_mask) or mask[b, t]
                _position(p[b, t], bias, state[b], out[b, t], q, k, num_states, rank, eps, write, rule, normalize)

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def _plain_kernel(q, k, v, beta, state, mask, out, has_mask):  # pragma: no cover - compiled
        # The bare delta rule on prepared q, k, v, β (B, T, N, r): the standard ops contract.
        B, T, N, r = q.shape
        for b in range(B):
            for t in range(T):
                write = (not has_mask) or mask[b, t]
                for n in range(N):
                    for i in range(r):
                        acc_q = 0.0
                        acc_k = 0.0
                        for j in range(r):
                            s = state[b, n, i, j]
                            acc_q += s * q[b, t, n, j]
                            acc_k += s * k[b, t, n, j]
                        out[b, t, n, i] = acc_q
                        if write:
                            bi = beta[b, t, n, i]
                            e = bi * (v[b, t, n, i] - acc_k)
                            for j in range(r):
                                state[b, n, i, j] = (1.0 - bi) * state[b, n, i, j] + e * k[b, t, n, j]


_NO_MASK = np.ones((1, 1), dtype=np.bool_)
_EPS32 = np.float32(L2_EPS)


def fused_write_unchecked(
    p: Tensor, bias: np.ndarray, memory: Tensor, mask: Tensor | None, num_states: int, rank: int,
    rule: int = RULE_COUPLED, normalize_qk: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`delta_rule_fused_cpu` without argument checks, for the decode hot path (every Python line costs
    ~1 µs there, ×30 layers per token). ``p (B, T, 4·N·r)`` contiguous float32 not requiring grad, ``bias`` the
    write-gate bias as a float32 numpy array, ``memory (B, N, r, r)`` float32 (not modified)."""
    state = memory.clone()
    out = torch.empty(p.shape[0], p.shape[1], num_states * rank)
    m, has_mask = (_NO_MASK, False) if mask is None else (_np(mask), True)
    _fused_kernel(p.numpy(), bias, state.numpy(), m, out.numpy(), num_states, rank, _EPS32, has_mask, rule,
                  normalize_qk)
    return out, state


if numba is not None:

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def _decode_kernel(x, in_t, bias, state, mask, out, out_q, wq_t, scale, num_states, rank, eps,
                       has_mask, steer_q, rule, normalize):  # pragma: no cover - compiled
        # One position per row (decode): x (R, d) attention input; in_t (d, 4·N·r); state (R, N, r, r) in/out;
        # out (R, N·r) reads; out_q (R, q_out) q_proj output, steered in place by scale·reads @ wq_t (N·r, q_out).
        # Doing the projection and the steering here too removes three eager torch calls per layer and token:
        # in situ (caches cold after the MLP's weight streaming) each costs ≈10 µs, more than its arithmetic.
        R, d = x.shape
        W4 = in_t.shape[1]
        width = num_states * rank
        p = np.empty(W4, dtype=np.float32)
        q = np.empty(rank, dtype=np.float32)
        k = np.empty(rank, dtype=np.float32)
        for b in range(R):
            for c in range(W4):
                p[c] = 0.0
            for i in range(d):
                xi = x[b, i]
                for c in range(W4):
                    p[c] += xi * in_t[i, c]
            write = (not has_mask) or mask[b]
            _position(p, bias, state[b], out[b], q, k, num_states, rank, eps, write, rule, normalize)
            if steer_q:
                for c in range(width):
                    rc = scale * out[b, c]
                    for j in range(out_q.shape[1]):
                        out_q[b, j] += rc * wq_t[c, j]


_NO_STEER = np.zeros((1, 1), dtype=np.float32)
_NO_ROW_MASK = np.ones(1, dtype=np.bool_)


def decode_write_steer_(
    x: Tensor, in_t: Tensor, bias: np.ndarray, memory: Tensor, mask: Tensor | None, out_q: Tensor,
    wq_t: Tensor | None, scale: float, num_states: int, rank: int, rule: int = RULE_COUPLED,
    normalize_qk: bool = True,
) -> tuple[Tensor, Tensor]:
    """Decode hot path in one compiled call: projection, activations, read, write, and the query steering
    (added to ``out_q`` in place). ``x (R, d)`` one position per row, ``out_q (R, q_out)`` contiguous, ``memory
    (R, N, r, r)`` (not modified). Returns reads ``(R, N·r)`` and the new memory. No argument checks (hot path)."""
    state = memory.clone()
    out = torch.empty(x.shape[0], num_states * rank)
    m = _NO_ROW_MASK if mask is None else _np(mask.reshape(-1))
    steer = wq_t is not None
    _decode_kernel(x.numpy(), in_t.numpy(), bias, state.numpy(), m, out.numpy(), out_q.numpy(),
                   wq_t.numpy() if steer else _NO_STEER, np.float32(scale), num_states, rank, _EPS32,
                   mask is not None, steer, rule, normalize_qk)
    return out, state


def _np(x: Tensor) -> np.ndarray:
    return x.detach().contiguous().numpy()


def delta_rule_fused_cpu(
    p: Tensor, beta_bias: Tensor, memory: Tensor, mask: Tensor | None, num_states: int, rank: int,
    *, rule: int = RULE_COUPLED, normalize_qk: bool = True,
) -> tuple[Tensor, Tensor]:
    """Activations + read-before-write scan in one compiled call (no autograd).

    Args:
        p: ``(B, T, 4·N·r)`` float32 raw memory projections ``[q̂; k̂; v; b̂]`` (CPU).
        beta_bias: ``(N·r,)`` write-gate bias.
        memory: ``(B, N, r, r)`` float32 state before position 0 (not modified).
        mask: ``(B, T)`` bool, False = padding (read computed, no write), or None.
        rule: ``RULE_COUPLED`` (the paper), ``RULE_LAMBDA_OUTSIDE`` or ``RULE_DELTA`` (see :func:`kernel_rule`).
        normalize_qk: tanh + L2 norm of the query and key (the paper); False uses the raw projections.
    Returns:
        reads ``(B, T, N·r)`` float32 and the new state ``(B, N, r, r)``.
    """
    if not AVAILABLE:
        raise RuntimeError("the fused CPU kernel needs numba (pip install numba)")
    B, T, W4 = p.shape
    if W4 != 4 * num_states * rank or tuple(memory.shape) != (B, num_states, rank, rank):
        raise ValueError(f"shape mismatch: p {tuple(p.shape)}, memory {tuple(memory.shape)}, N={num_states}, r={rank}")
    if p.dtype != torch.float32 or memory.dtype != torch.float32:
        raise ValueError("the fused CPU kernel takes float32 projections and state")
    if rule not in (RULE_COUPLED, RULE_LAMBDA_OUTSIDE, RULE_DELTA):
        raise ValueError(f"unknown kernel rule {rule!r}; see kernel_rule()")
    bias = beta_bias.detach().float().contiguous().numpy()
    return fused_write_unchecked(p.detach().contiguous(), bias, memory.detach().contiguous(), mask, num_states, rank,
                                 rule, bool(normalize_qk))


def delta_rule_numba(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule with the ops contract of :func:`.reference.delta_rule_reference`, compiled (CPU,
    float32 or float64, no autograd). Used to test the compiled scan on its own."""
    from .reference import check_inputs

    B, T, N, r = check_inputs(q, k, v, beta, initial_state, mask)
    if not AVAILABLE:
        raise RuntimeError("delta_rule_numba needs numba (pip install numba)")
    state = (q.new_zeros(B, N, r, r) if initial_state is None else initial_state.detach().clone()).contiguous()
    out = q.new_empty(B, T, N, r)
    has_mask = mask is not None
    m = _np(mask.to(torch.bool)) if has_mask else np.ones((1, 1), dtype=np.bool_)
    _plain_kernel(_np(q), _np(k), _np(v), _np(beta), state.numpy(), m, out.numpy(), has_mask)
    return out, state
