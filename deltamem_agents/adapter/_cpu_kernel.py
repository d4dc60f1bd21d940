"""The compiled CPU kernel of the δ-mem token write (inference only, numba): private to the layer.

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

Why private to the layer (and not in :mod:`deltamem_agents.ops`): it takes the layer's raw fused projections
``[q̂; k̂; v; b̂]`` with its gate bias and activations (the decode variant even the projection and the query
steering), i.e. the layer's parametrisation, not the ``(q, k, v, β)`` contract of the ops. It has no autograd;
:class:`~deltamem_agents.adapter.kernel_choice.KernelChoice` picks it only for float32 CPU calls that need no
gradient. It is tested against the layer's torch path and the per-token reference
(:func:`~deltamem_agents.ops.delta_rule_reference`, after the same activations). ``nogil=True`` lets sessions on
different threads run their scans in parallel.

numba is optional: :data:`AVAILABLE` is False when it is not installed, and the torch paths are used.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

try:  # optional dependency
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

#: numba is installed (whether the kernel is used is :mod:`.kernel_choice`'s decision, per call)
AVAILABLE = numba is not None

__all__ = [
    "AVAILABLE",
    "RULE_COUPLED",
    "RULE_DELTA",
    "RULE_LAMBDA_OUTSIDE",
    "decode_write_steer_",
    "delta_rule_fused_cpu",
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
    x: Tensor, in_t: Tensor, bias: np.ndarray, memory: Tensor, mask: Tensor | None, out_q: Tensor | None,
    wq_t: Tensor | None, scale: float, num_states: int, rank: int, rule: int = RULE_COUPLED,
    normalize_qk: bool = True,
) -> tuple[Tensor, Tensor]:
    """Decode hot path in one compiled call: projection, activations, read, write, and the query steering
    (added to ``out_q`` in place; skipped when ``wq_t`` is None). ``x (R, d)`` contiguous, one position per row,
    ``out_q (R, q_out)`` contiguous, ``memory (R, N, r, r)`` (not modified). Returns reads ``(R, N·r)`` and the new
    memory. No argument checks (hot path)."""
    state = memory.clone()
    out = torch.empty(x.shape[0], num_states * rank)
    m = _NO_ROW_MASK if mask is None else _np(mask.reshape(-1))
    steer = wq_t is not None
    _decode_kernel(x.numpy(), in_t.numpy(), bias, state.numpy(), m, out.numpy(),
                   out_q.numpy() if steer else _NO_STEER, wq_t.numpy() if steer else _NO_STEER, np.float32(scale),
                   num_states, rank, _EPS32, mask is not None, steer, rule, normalize_qk)
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
