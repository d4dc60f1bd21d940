"""Triton kernels of the gated delta rule over a sequence, forward and backward (prefill and training).

Same contract as :func:`.reference.delta_rule_reference` (the specification these kernels are tested against):
``fn(q, k, v, beta, initial_state=None, mask=None) -> (out, final_state)`` with ``q, k, v, beta (B, T, N, r)``, the
state ``(B, N, r, r)`` (rows = value dim, columns = key dim), every token reading ``S_{t-1} q_t`` *before* its own
write, and masked (False) positions writing nothing while their read is still computed.

The update is written in the general affine form the authors' code uses, per row ``i`` of a sub-state::

    S_t[i] = keep_i S_{t-1}[i] − erase_i (S_{t-1}[i]·k_t) k_t + write_i v_i k_t

with three per-row gates. The paper's coupled rule is ``keep = 1 − β, erase = write = β``; a separate retention
``λ`` (our ``decoupled``/``delta`` rules, the authors' ``couple_lambda=False``/``no_lambda``) is ``keep = λ``; the
authors' ``lambda_outside`` is ``erase = λ β``. :func:`delta_rule_triton` takes ``beta`` (and ``decay``) like the
torch paths; :func:`delta_rule_triton_affine` takes the three gates.

Dtypes: ``q, k, v`` and the gates may be float32, bfloat16 or float16 (one dtype); every kernel loads them into
float32 and does all arithmetic in float32. The state is float32 whatever the input dtype (``initial_state`` of any
floating dtype is read as float32; ``final_state`` is float32): a bf16 state would lose the memory's small
increments over thousands of tokens. ``out`` has the dtype of ``q``; gradients have the dtype of their input.
float64 is refused (the torch paths serve float64).

Algorithm (why not one loop over ``T``): a plain sequential scan has a dependency chain of ``T`` steps, each a few
dependent global loads; at 32k tokens that is tens of milliseconds per layer on a GPU, comparable to the whole
model's prefill. Every row of the state evolves by an affine map ``s ← s A_t + b_t`` with the symmetric
``A_t = keep I − erase k_t k_tᵀ``, so the sequence is split into chunks of ``C`` positions and:

1. ``_fwd_transition`` (all chunks in parallel, one program per chunk and sub-state): every row's map of the
   chunk, ``s_end = s_start M_c + h_c`` with ``M_c = A_first ⋯ A_last`` (``r × r`` per row, an ``r × r × r``
   block per program), by ``C`` rank-one updates;
2. ``_fwd_carry`` (one program per sub-state): ``s ← s M_c + h_c`` over the ``T / C`` chunks: each chunk's start;
3. ``_fwd_reads`` (all chunks in parallel, one program per chunk and sub-state): replays the chunk from its start
   exactly as the reference does, writing the reads (and the final state from the last chunk).

The longest dependency chain is ``2C + T/C`` steps instead of ``T``. The backward pass mirrors it on the adjoint
``g`` of the state, which runs backwards by ``g_{t−1} = g_t A_t + do_t q_t`` (``A_t`` symmetric): chunk offsets
``u_c`` from the reads alone (``_bwd_offsets``), the carry ``g ← g M_cᵀ + u_c`` (``_bwd_carry``), then per chunk a
replay that stores the chunk's states in a scratch buffer and walks it backwards computing every gradient
(``_bwd_positions``). Sums over the rows of a sub-state (``dq``, ``dk``) stay inside one program: no atomics, so the
gradients are deterministic. No exponentials or logarithms of the gates appear (unlike :mod:`.chunked`), so a gate
of exactly 0 or 1 needs no clamping.

Memory: the forward keeps ``(B, N, T/C, r, r)`` chunk starts and ``(B, N, T/C, r, r, r)`` chunk maps for the
backward (for ``r = 8``, ``C = 128``: 2.3 KiB per chunk and sub-state); the backward allocates a transient
``(B, N, T, r, r)`` float32 scratch (8 MiB per layer at ``T = 32k``, ``r = 8``, ``N = 1``).

Limits: the state must be square (no wide values: those take :mod:`.shared_gate`), ``r ≤ 64``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .triton_support import AVAILABLE, check_device, jit, next_power_of_2, tl

__all__ = ["MAX_RANK", "default_chunk_size", "delta_rule_triton", "delta_rule_triton_affine"]

MAX_RANK = 64
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Gate modes (constexpr in the kernels): which of the three gate pointers are read, and how the gradient is folded.
COUPLED, DECAY, AFFINE = 0, 1, 2
# Warps per program. The kernels are latency-bound loops over tiny tiles (r × r, or r × r × r for the chunk maps):
# one warp keeps every reduction of an r × r tile inside the warp (shuffles, no shared memory and barriers per
# step); the r³ maps get more threads. Ignored by the interpreter; not yet tuned on a GPU.
WARPS_TILE, WARPS_CUBE = 1, 4


if AVAILABLE:

    def _fwd_transition(k_ptr, v_ptr, g0_ptr, g1_ptr, g2_ptr, mask_ptr, m_ptr, h_ptr, T, N, R, C, NC,
                        MODE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        # Program (b, n) × chunk c: the chunk's affine map of every state row i, M[i] (R × R) and h[i] (R).
        # h evolves exactly like the state from a zero start; M[i] = Π_t (keep_i I − erase_i k_t k_tᵀ).
        bn = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        b = bn // N
        n = bn % N
        a = tl.arange(0, BLOCK)
        ok = a < R
        ok2 = ok[:, None] & ok[None, :]
        ok3 = ok[:, None, None] & ok2[None, :, :]
        M = tl.where((a[None, :, None] == a[None, None, :]) & ok3, 1.0, 0.0).to(tl.float32)  # [i, a, j]
        H = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # [i, j]
        t0 = c * C
        t1 = tl.minimum(t0 + C, T)
        for t in range(t0, t1):
            row = ((b * T + t) * N + n) * R
            kv = tl.load(k_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            g0 = tl.load(g0_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            if MODE == 0:
                keep = 1.0 - g0
                erase = g0
            elif MODE == 1:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = g0
            else:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = tl.load(g2_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            write = g0
            if HAS_MASK:
                valid = tl.load(mask_ptr + b * T + t) != 0
                keep = tl.where(valid, keep, 1.0)
                erase = tl.where(valid, erase, 0.0)
                write = tl.where(valid, write, 0.0)
            Mk = tl.sum(M * kv[None, None, :], axis=2)  # [i, a]
            M = keep[:, None, None] * M - (erase[:, None] * Mk)[:, :, None] * kv[None, None, :]
            Hk = tl.sum(H * kv[None, :], axis=1)
            H = keep[:, None] * H + (write * v - erase * Hk)[:, None] * kv[None, :]
        slot = bn * NC + c
        cube = (a[:, None, None] * R + a[None, :, None]) * R + a[None, None, :]
        tl.store(m_ptr + slot * R * R * R + cube, M, mask=ok3)
        tl.store(h_ptr + slot * R * R + a[:, None] * R + a[None, :], H, mask=ok2)

    def _fwd_carry(init_ptr, m_ptr, h_ptr, starts_ptr, R, NC, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
        # Program (b, n): the state at the start of every chunk, S ← S M + H row by row.
        bn = tl.program_id(0).to(tl.int64)
        a = tl.arange(0, BLOCK)
        ok = a < R
        ok2 = ok[:, None] & ok[None, :]
        ok3 = ok[:, None, None] & ok2[None, :, :]
        tile = a[:, None] * R + a[None, :]
        cube = (a[:, None, None] * R + a[None, :, None]) * R + a[None, None, :]
        if HAS_INIT:
            S = tl.load(init_ptr + bn * R * R + tile, mask=ok2, other=0.0).to(tl.float32)
        else:
            S = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for c in range(0, NC):
            slot = bn * NC + c
            tl.store(starts_ptr + slot * R * R + tile, S, mask=ok2)
            M = tl.load(m_ptr + slot * R * R * R + cube, mask=ok3, other=0.0)
            H = tl.load(h_ptr + slot * R * R + tile, mask=ok2, other=0.0)
            S = tl.sum(S[:, :, None] * M, axis=1) + H  # (s_i M_i)_j = Σ_a s_ia M_i[a, j]

    def _fwd_reads(q_ptr, k_ptr, v_ptr, g0_ptr, g1_ptr, g2_ptr, mask_ptr, starts_ptr, out_ptr, final_ptr,
                   T, N, R, C, NC, MODE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        # Program (b, n) × chunk c: replay the chunk from its start (the reference's loop), reads out.
        bn = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        b = bn // N
        n = bn % N
        a = tl.arange(0, BLOCK)
        ok = a < R
        ok2 = ok[:, None] & ok[None, :]
        tile = a[:, None] * R + a[None, :]
        S = tl.load(starts_ptr + (bn * NC + c) * R * R + tile, mask=ok2, other=0.0).to(tl.float32)
        t0 = c * C
        t1 = tl.minimum(t0 + C, T)
        for t in range(t0, t1):
            row = ((b * T + t) * N + n) * R
            q = tl.load(q_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            kv = tl.load(k_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            g0 = tl.load(g0_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            if MODE == 0:
                keep = 1.0 - g0
                erase = g0
            elif MODE == 1:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = g0
            else:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = tl.load(g2_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            write = g0
            if HAS_MASK:
                valid = tl.load(mask_ptr + b * T + t) != 0
                keep = tl.where(valid, keep, 1.0)
                erase = tl.where(valid, erase, 0.0)
                write = tl.where(valid, write, 0.0)
            read = tl.sum(S * q[None, :], axis=1)  # read before write
            tl.store(out_ptr + row + a, read.to(out_ptr.dtype.element_ty), mask=ok)
            Sk = tl.sum(S * kv[None, :], axis=1)
            S = keep[:, None] * S + (write * v - erase * Sk)[:, None] * kv[None, :]
        if c == NC - 1:
            tl.store(final_ptr + bn * R * R + tile, S, mask=ok2)

    def _bwd_offsets(q_ptr, k_ptr, g0_ptr, g1_ptr, g2_ptr, mask_ptr, do_ptr, u_ptr, T, N, R, C, NC,
                     MODE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        # Program (b, n) × chunk c: the adjoint at the chunk's start from its own reads only (zero at its end).
        bn = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        b = bn // N
        n = bn % N
        a = tl.arange(0, BLOCK)
        ok = a < R
        ok2 = ok[:, None] & ok[None, :]
        U = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        t0 = c * C
        t1 = tl.minimum(t0 + C, T)
        for s in range(0, t1 - t0):
            t = t1 - 1 - s
            row = ((b * T + t) * N + n) * R
            q = tl.load(q_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            kv = tl.load(k_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            g0 = tl.load(g0_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            if MODE == 0:
                keep = 1.0 - g0
                erase = g0
            elif MODE == 1:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = g0
            else:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = tl.load(g2_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            if HAS_MASK:
                valid = tl.load(mask_ptr + b * T + t) != 0
                keep = tl.where(valid, keep, 1.0)
                erase = tl.where(valid, erase, 0.0)
            do = tl.load(do_ptr + row + a, mask=ok, other=0.0)
            Uk = tl.sum(U * kv[None, :], axis=1)
            U = keep[:, None] * U - (erase * Uk)[:, None] * kv[None, :] + do[:, None] * q[None, :]
        tl.store(u_ptr + (bn * NC + c) * R * R + a[:, None] * R + a[None, :], U, mask=ok2)

    def _bwd_carry(m_ptr, u_ptr, dfinal_ptr, gend_ptr, R, NC, HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
        # Program (b, n): the adjoint of the state at the end of every chunk, from the last chunk down.
        bn = tl.program_id(0).to(tl.int64)
        a = tl.arange(0, BLOCK)
        ok = a < R
        ok2 = ok[:, None] & ok[None, :]
        ok3 = ok[:, None, None] & ok2[None, :, :]
        tile = a[:, None] * R + a[None, :]
        cube = (a[:, None, None] * R + a[None, :, None]) * R + a[None, None, :]
        if HAS_DFINAL:
            G = tl.load(dfinal_ptr + bn * R * R + tile, mask=ok2, other=0.0).to(tl.float32)
        else:
            G = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for s in range(0, NC):
            slot = bn * NC + NC - 1 - s
            tl.store(gend_ptr + slot * R * R + tile, G, mask=ok2)
            M = tl.load(m_ptr + slot * R * R * R + cube, mask=ok3, other=0.0)
            U = tl.load(u_ptr + slot * R * R + tile, mask=ok2, other=0.0)
            G = tl.sum(M * G[:, None, :], axis=2) + U  # (g_i M_iᵀ)_a = Σ_j g_ij M_i[a, j]

    def _bwd_positions(q_ptr, k_ptr, v_ptr, g0_ptr, g1_ptr, g2_ptr, mask_ptr, starts_ptr, gend_ptr, do_ptr,
                       scratch_ptr, dq_ptr, dk_ptr, dv_ptr, dg0_ptr, dg1_ptr, dg2_ptr, gstart_ptr, T, N, R, C, NC,
                       MODE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        # Program (b, n) × chunk c: replay the chunk storing S_{t-1}, then walk it backwards with the adjoint G.
        bn = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        b = bn // N
        n = bn % N
        a = tl.arange(0, BLOCK)
        ok = a < R
        ok2 = ok[:, None] & ok[None, :]
        tile = a[:, None] * R + a[None, :]
        S = tl.load(starts_ptr + (bn * NC + c) * R * R + tile, mask=ok2, other=0.0).to(tl.float32)
        t0 = c * C
        t1 = tl.minimum(t0 + C, T)
        for t in range(t0, t1):
            tl.store(scratch_ptr + (bn * T + t) * R * R + tile, S, mask=ok2)
            row = ((b * T + t) * N + n) * R
            kv = tl.load(k_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            g0 = tl.load(g0_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            if MODE == 0:
                keep = 1.0 - g0
                erase = g0
            elif MODE == 1:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = g0
            else:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = tl.load(g2_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            write = g0
            if HAS_MASK:
                valid = tl.load(mask_ptr + b * T + t) != 0
                keep = tl.where(valid, keep, 1.0)
                erase = tl.where(valid, erase, 0.0)
                write = tl.where(valid, write, 0.0)
            Sk = tl.sum(S * kv[None, :], axis=1)
            S = keep[:, None] * S + (write * v - erase * Sk)[:, None] * kv[None, :]
        tl.debug_barrier()  # the scratch written above is read back below, possibly by other threads
        G = tl.load(gend_ptr + (bn * NC + c) * R * R + tile, mask=ok2, other=0.0)
        for s in range(0, t1 - t0):
            t = t1 - 1 - s
            S = tl.load(scratch_ptr + (bn * T + t) * R * R + tile, mask=ok2, other=0.0)
            row = ((b * T + t) * N + n) * R
            q = tl.load(q_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            kv = tl.load(k_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            do = tl.load(do_ptr + row + a, mask=ok, other=0.0)
            g0 = tl.load(g0_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            if MODE == 0:
                keep = 1.0 - g0
                erase = g0
            elif MODE == 1:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = g0
            else:
                keep = tl.load(g1_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
                erase = tl.load(g2_ptr + row + a, mask=ok, other=0.0).to(tl.float32)
            write = g0
            if HAS_MASK:
                valid = tl.load(mask_ptr + b * T + t) != 0
                keep = tl.where(valid, keep, 1.0)
                erase = tl.where(valid, erase, 0.0)
                write = tl.where(valid, write, 0.0)
            Sk = tl.sum(S * kv[None, :], axis=1)
            Gk = tl.sum(G * kv[None, :], axis=1)
            e = write * v - erase * Sk
            tl.store(dq_ptr + row + a, tl.sum(do[:, None] * S, axis=0), mask=ok)
            dk = tl.sum(e[:, None] * G, axis=0) - tl.sum((erase * Gk)[:, None] * S, axis=0)
            tl.store(dk_ptr + row + a, dk, mask=ok)
            tl.store(dv_ptr + row + a, write * Gk, mask=ok)
            d_keep = tl.sum(G * S, axis=1)
            d_erase = -Sk * Gk
            d_write = v * Gk
            if HAS_MASK:  # a masked position's gates are constants: no gradient reaches them
                d_keep = tl.where(valid, d_keep, 0.0)
                d_erase = tl.where(valid, d_erase, 0.0)
                d_write = tl.where(valid, d_write, 0.0)
            if MODE == 0:
                tl.store(dg0_ptr + row + a, d_write + d_erase - d_keep, mask=ok)
            elif MODE == 1:
                tl.store(dg0_ptr + row + a, d_write + d_erase, mask=ok)
                tl.store(dg1_ptr + row + a, d_keep, mask=ok)
            else:
                tl.store(dg0_ptr + row + a, d_write, mask=ok)
                tl.store(dg1_ptr + row + a, d_keep, mask=ok)
                tl.store(dg2_ptr + row + a, d_erase, mask=ok)
            G = keep[:, None] * G - (erase * Gk)[:, None] * kv[None, :] + do[:, None] * q[None, :]
        tl.store(gstart_ptr + (bn * NC + c) * R * R + tile, G, mask=ok2)


def default_chunk_size(T: int) -> int:
    """A power of two near ``√T`` in ``[16, 128]``: balances the in-chunk chain (``2C``) against the carry
    (``T/C``) while keeping enough chunks in flight to fill a GPU."""
    return max(16, min(128, next_power_of_2(math.isqrt(max(T, 1)))))


class _Scan(torch.autograd.Function):
    """Autograd of the three-kernel scan. Inputs contiguous, gates as ``(g0, g1, g2)`` per ``mode``."""

    @staticmethod
    def forward(ctx, q, k, v, g0, g1, g2, initial_state, mask, mode: int, chunk: int):
        B, T, N, R = q.shape
        NC = -(-T // chunk)
        BLOCK = next_power_of_2(R)
        dev = q.device
        has_mask = mask is not None
        m8 = mask.view(torch.int8) if has_mask else q  # any valid pointer when absent
        g1_ = g1 if g1 is not None else g0
        g2_ = g2 if g2 is not None else g0
        out = torch.empty_like(q)
        final = torch.empty(B, N, R, R, device=dev, dtype=torch.float32)
        maps = None
        if NC == 1:
            starts = (initial_state.to(torch.float32).contiguous() if initial_state is not None
                      else torch.zeros(B, N, R, R, device=dev, dtype=torch.float32)).view(B, N, 1, R, R)
        else:
            maps = torch.empty(B, N, NC, R, R, R, device=dev, dtype=torch.float32)
            offsets = torch.empty(B, N, NC, R, R, device=dev, dtype=torch.float32)
            jit(_fwd_transition)[(B * N, NC)](k, v, g0, g1_, g2_, m8, maps, offsets, T, N, R, chunk, NC,
                                                  MODE=mode, HAS_MASK=has_mask, BLOCK=BLOCK, num_warps=WARPS_CUBE)
            starts = torch.empty(B, N, NC, R, R, device=dev, dtype=torch.float32)
            init = initial_state.to(torch.float32).contiguous() if initial_state is not None else starts
            jit(_fwd_carry)[(B * N,)](init, maps, offsets, starts, R, NC,
                                           HAS_INIT=initial_state is not None, BLOCK=BLOCK,
                                           num_warps=WARPS_CUBE)
        jit(_fwd_reads)[(B * N, NC)](q, k, v, g0, g1_, g2_, m8, starts, out, final, T, N, R, chunk, NC,
                                     MODE=mode, HAS_MASK=has_mask, BLOCK=BLOCK, num_warps=WARPS_TILE)
        ctx.mode, ctx.chunk, ctx.has_mask, ctx.NC = mode, chunk, has_mask, NC
        ctx.has_g1, ctx.has_g2 = g1 is not None, g2 is not None
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        ctx.save_for_backward(q, k, v, g0, g1_, g2_, mask if has_mask else None, starts, maps)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, g0, g1, g2, mask, starts, maps = ctx.saved_tensors
        B, T, N, R = q.shape
        NC, chunk, mode = ctx.NC, ctx.chunk, ctx.mode
        BLOCK = next_power_of_2(R)
        dev = q.device
        f32 = torch.float32
        do = (d_out.to(f32).contiguous() if d_out is not None else torch.zeros(B, T, N, R, device=dev, dtype=f32))
        has_dfinal = d_final is not None
        dfinal = d_final.to(f32).contiguous() if has_dfinal else do
        m8 = mask.view(torch.int8) if mask is not None else q
        if NC == 1:
            gend = dfinal.view(B, N, 1, R, R) if has_dfinal else torch.zeros(B, N, 1, R, R, device=dev, dtype=f32)
        else:
            u = torch.empty(B, N, NC, R, R, device=dev, dtype=f32)
            jit(_bwd_offsets)[(B * N, NC)](q, k, g0, g1, g2, m8, do, u, T, N, R, chunk, NC,
                                               MODE=mode, HAS_MASK=ctx.has_mask, BLOCK=BLOCK, num_warps=WARPS_TILE)
            gend = torch.empty(B, N, NC, R, R, device=dev, dtype=f32)
            jit(_bwd_carry)[(B * N,)](maps, u, dfinal, gend, R, NC, HAS_DFINAL=has_dfinal, BLOCK=BLOCK,
                                      num_warps=WARPS_CUBE)
        scratch = torch.empty(B, N, T, R, R, device=dev, dtype=f32)
        dq, dk, dv, dg0 = (torch.empty(B, T, N, R, device=dev, dtype=f32) for _ in range(4))
        dg1 = torch.empty_like(dg0) if mode != COUPLED else dg0
        dg2 = torch.empty_like(dg0) if mode == AFFINE else dg0
        gstart = torch.empty(B, N, NC, R, R, device=dev, dtype=f32)
        jit(_bwd_positions)[(B * N, NC)](q, k, v, g0, g1, g2, m8, starts, gend, do, scratch, dq, dk, dv,
                                         dg0, dg1, dg2, gstart, T, N, R, chunk, NC,
                                         MODE=mode, HAS_MASK=ctx.has_mask, BLOCK=BLOCK, num_warps=WARPS_TILE)
        d_init = gstart[:, :, 0].to(ctx.init_dtype) if ctx.init_dtype is not None else None
        dt = q.dtype
        return (dq.to(dt), dk.to(dt), dv.to(dt), dg0.to(dt),
                dg1.to(dt) if ctx.has_g1 else None, dg2.to(dt) if ctx.has_g2 else None,
                d_init, None, None, None)


def _check(q: Tensor, named: list[tuple[str, Tensor | None]], initial_state: Tensor | None,
           mask: Tensor | None, chunk_size: int | None) -> int:
    """Shape/dtype/device checks (metadata only: no host syncs). Returns the chunk size to use."""
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, T, N, r), got {tuple(q.shape)}")
    B, T, N, R = q.shape
    if q.dtype not in _FLOATS:
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {q.dtype} "
                         "(float64: use the torch paths)")
    if R > MAX_RANK:
        raise ValueError(f"the Triton kernels support r <= {MAX_RANK}, got r = {R}")
    for name, x in named:
        if x is None:
            continue
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)} "
                             "(wide values: use the torch shared-gate path)")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, N, R, R):
            raise ValueError(f"initial_state must have shape (B, N, r, r) = {(B, N, R, R)}, "
                             f"got {tuple(initial_state.shape)}")
        if not initial_state.is_floating_point() or initial_state.dtype == torch.float64:
            raise ValueError(f"initial_state must be float32, bfloat16 or float16, got {initial_state.dtype}")
    if mask is not None and (tuple(mask.shape) != (B, T) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape (B, T) = {(B, T)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_device(q, *(x for _, x in named), initial_state, mask)
    return min(chunk_size or default_chunk_size(T), max(T, 1))


def _run(q, k, v, g0, g1, g2, initial_state, mask, mode, chunk_size) -> tuple[Tensor, Tensor]:
    B, T, N, R = q.shape
    if T == 0:
        state = (initial_state.to(torch.float32) if initial_state is not None
                 else q.new_zeros(B, N, R, R, dtype=torch.float32))
        return q.new_zeros(B, 0, N, R), state
    c = [x.contiguous() if x is not None else None for x in (q, k, v, g0, g1, g2)]
    m = mask.contiguous() if mask is not None else None
    return _Scan.apply(*c, initial_state, m, mode, chunk_size)


def delta_rule_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    decay: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule over a sequence (Triton; differentiable in every input).

    Args:
        q, k: ``(B, T, N, r)`` read query / write key (L2-normalised by the caller).
        v: ``(B, T, N, r)`` value written.
        beta: ``(B, T, N, r)`` per-row write strength in ``[0, 1]``.
        initial_state: ``(B, N, r, r)`` state before position 0 (read as float32), or None for zeros.
        mask: ``(B, T)`` bool, False = padding (no write, no decay; its read is still computed), or None.
        decay: ``(B, T, N, r)`` retention ``λ`` (``keep = λ``), or None for the paper's ``1 − beta``.
        chunk_size: positions per chunk (None: :func:`default_chunk_size`); the result does not depend on it
            beyond float32 rounding.

    Returns:
        ``(out, final_state)``: ``out (B, T, N, r)`` in the dtype of ``q`` with ``out[:, t] = S_{t-1} q_t``, and
        ``final_state (B, N, r, r)`` float32.

    Raises:
        ValueError: bad shapes or dtypes. TritonUnavailableError: no Triton, or CPU tensors without the interpreter.
    """
    chunk = _check(q, [("k", k), ("v", v), ("beta", beta), ("decay", decay)], initial_state, mask, chunk_size)
    return _run(q, k, v, beta, decay, None, initial_state, mask, COUPLED if decay is None else DECAY, chunk)


def delta_rule_triton_affine(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    erase: Tensor,
    write: Tensor,
    initial_state: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The general affine update ``S[i] ← keep_i S[i] − erase_i (S[i]·k) k + write_i v_i k`` (Triton,
    differentiable). Covers the authors' ``state_update_mode`` values: ``standard`` (``keep = λ``, ``erase = write
    = β``), ``lambda_outside`` (``erase = λ β``), ``no_lambda`` (``keep = 1``). Shapes, dtypes and returns as
    :func:`delta_rule_triton`; the gates are ``(B, T, N, r)``.
    """
    chunk = _check(q, [("k", k), ("v", v), ("keep", keep), ("erase", erase), ("write", write)], initial_state,
                   mask, chunk_size)
    return _run(q, k, v, write, keep, erase, initial_state, mask, AFFINE, chunk)
