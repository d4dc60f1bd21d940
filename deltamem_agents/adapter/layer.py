"""`DeltaMemLayer`: the trainable δ-mem weights of one attention layer and the read/write computation.

Per position ``t`` with hidden state ``x_t`` (the input of ``q_proj``, i.e. after the layer's input norm):

    [q̂; k̂; v; b] = W_in x_t                  one fused (4·N·r × d) matmul for the four memory projections
    q_t = l2norm(tanh(q̂)), k_t = l2norm(tanh(k̂))   per sub-state
    β_t = σ(b + b_β)
    r_t = S_{t-1} q_t                        read the old state (N sub-states, reads concatenated → N·r)
    S_t = Diag(1-β_t) S_{t-1} + Diag(β_t)(v_t - S_{t-1} k_t) k_tᵀ

(the paper's coupled rule; ``update_rule`` ``decoupled`` replaces ``1 − β_t`` by ``λ_t = σ(W_λ x_t + b_λ)`` and
``delta`` by 1 — extensions beyond the paper; the authors' options ``state_update_mode="lambda_outside"`` scales
the erase term ``S_{t-1} k_t k_tᵀ`` by ``λ_t`` too, and ``normalize_qk=False`` drops the tanh and L2 norm), and the
attention branches are steered by ``(α/r)·W_q^Δ r_t`` (added to the output of ``q_proj``) and ``(α/r)·W_o^Δ r_t``
(added to the output of ``o_proj``).

The memory arithmetic runs in the dtype of the state it is given (float32 by default whatever the model dtype;
float64 for a float64 model): the methods take the state and cast the projections to its dtype. The parameters are
float32 whatever the base model's dtype (float64 for a float64 model): on a bf16 base the projections and
corrections run in bf16 through casts of the float32 weights (autograd carries the gradients back to them), the way
mixed-precision training keeps float32 master weights — an AdamW step on bf16 weights would round most updates of
these small matrices away.

Which implementation computes a call (the compiled CPU kernel, the Triton kernels or the torch paths) is decided
in one place, :class:`~deltamem_agents.adapter.kernel_choice.KernelChoice` (``self.kernels``), for every call; the
model's hooks call :meth:`DeltaMemLayer.attend_query` and :meth:`DeltaMemLayer.attend_output` and do not know which
one runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import delta_rule_chunked, delta_rule_chunked_shared_gate, delta_rule_step
from . import _cpu_kernel
from .config import DeltaMemConfig
from .kernel_choice import (
    MESSAGES,
    NUMBA_DECODE,
    NUMBA_SCAN,
    READ,
    SEQUENCE,
    TOKENS,
    TRITON_DECODE,
    TRITON_SCAN,
    KernelChoice,
    kernel_from_env,
    triton_modules,
)
from .segments import MessageWritePlan, SegmentPlan

__all__ = ["DeltaMemLayer", "MemoryCall"]

L2_EPS = 1e-6
_HALF_OR_SINGLE = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class MemoryCall:
    """What one forward call does with the memory: planned once by the model's pre-hook, shared by every layer.

    Attributes:
        writes: the call writes the memory (False: every token reads the fixed state).
        write_mask: ``(B, T)`` bool, False = padding (writes nothing), or None. Passed as given, never checked on
            the host (``mask.all()`` would be a device sync per call on a GPU); an all-True mask is served by
            every kernel.
        plan: SSW (our semantics): the call's :class:`SegmentPlan`.
        message_plan: SSW (the authors' semantics): the call's :class:`MessageWritePlan`.
        form: ``read``, ``tokens``, ``sequence`` or ``messages`` (derived).
    """

    writes: bool = True
    write_mask: Tensor | None = None
    plan: SegmentPlan | None = None
    message_plan: MessageWritePlan | None = None
    form: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.writes:
            self.form = READ
        elif self.message_plan is not None:
            self.form = MESSAGES
        elif self.plan is not None:
            self.form = SEQUENCE
        else:
            self.form = TOKENS


class DeltaMemLayer(nn.Module):
    """δ-mem weights of one attention layer.

    Parameters (names are the on-disk tensor names under ``layers.{i}.``):
        in_proj: ``(4·N·r, d)`` rows ``[W_q^m; W_k^m; W_v^m; W_β]``, each block ``(N·r, d)``.
        beta_bias: ``(N·r,)`` write-gate bias ``b_β``.
        delta_q: ``(q_out, N·r)`` correction of the query branch (absent when ``"q"`` is not corrected).
        delta_o: ``(o_out, N·r)`` correction of the output branch (absent when ``"o"`` is not corrected).
        lambda_proj, lambda_bias: ``(N·r, d)`` and ``(N·r,)`` retention gate (``update_rule="decoupled"`` only).

    The parameters are created float32 by the model (float64 for a float64 base), whatever the base's dtype.
    ``kernel``: the kernel preference (``auto``, ``torch``, ``numba``, ``triton``; see :mod:`.kernel_choice`;
    default ``DELTAMEM_KERNEL``, else ``auto``); ``kernels``: a :class:`KernelChoice` shared with the adapter's
    other layers (the model passes one; ``kernel`` is then ignored).

    With ``wide_value`` (beyond the paper): ``in_proj`` is ``(2·N·r + N, d)`` rows ``[W_q^m; W_k^m; W_β]`` (one
    gate per sub-state), ``beta_bias`` and ``lambda_bias`` are ``(N,)``, ``lambda_proj`` ``(N, d)``, the state is
    ``(B, N, d, r)``, there are no ``delta_q``/``delta_o`` and ``wide_gain (1,)`` scales the decoded read.
    """

    def __init__(self, hidden_size: int, q_out: int, o_out: int, config: DeltaMemConfig,
                 kernel: str | None = None, kernels: KernelChoice | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_states = config.num_states
        self.rank = config.rank
        self.scale = config.scale
        width = config.state_width
        self.wide = config.wide_value
        self.hidden_size = hidden_size
        gates = config.num_states if self.wide else width  # gate rows: one per sub-state (wide) or per state row
        self.in_proj = nn.Parameter(torch.empty((2 * width + gates) if self.wide else 4 * width, hidden_size))
        self.beta_bias = nn.Parameter(torch.empty(gates))
        narrow = not self.wide
        self.delta_q = nn.Parameter(torch.empty(q_out, width)) if narrow and "q" in config.branches else None
        self.delta_o = nn.Parameter(torch.empty(o_out, width)) if narrow and "o" in config.branches else None
        self.wide_gain = nn.Parameter(torch.empty(1)) if self.wide else None
        decoupled = config.update_rule == "decoupled"
        self.lambda_proj = nn.Parameter(torch.empty(gates, hidden_size)) if decoupled else None
        self.lambda_bias = nn.Parameter(torch.empty(gates)) if decoupled else None
        #: which implementation runs each call (the one place that decides; see :mod:`.kernel_choice`)
        self.kernels = kernels or KernelChoice(config, kernel_from_env() if kernel is None else kernel)
        self.kernels.serve(self._parameters)
        # frozen v_proj/o_proj weights and head_dim of the attention (wide values only): references, not copies,
        # and a plain tuple so they are not registered as this layer's parameters
        self._wide_decoder: tuple[Tensor, Tensor, int] | None = None
        # contiguous transposed weight copies for the inference paths, keyed on dtype and parameter versions
        self._fast_cache: tuple[Any, _FastWeights] | None = None

    @torch.no_grad()
    def reset_parameters(self, q_weight: Tensor | None = None, o_weight: Tensor | None = None,
                         v_weight: Tensor | None = None, head_dim: int | None = None) -> None:
        """Initialise as the brief says: W^m Kaiming-uniform, W_β = 0, b_β = beta_bias_init, W^Δ zero or base slice
        (or, with ``init="ov_svd"``, ``W_v^m``/``W_o^Δ`` from the frozen ``v_weight``/``o_weight``)."""
        width = self.config.state_width
        projections = 2 if self.wide else 3  # q, k (and v unless the value is the hidden state itself)
        for block in self.in_proj[: projections * width].split(width, dim=0):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # nn.Linear's default
        if self.config.query_init == "key":  # W_q^m = W_k^m: a read with a written hidden state finds its key
            self.in_proj[:width].copy_(self.in_proj[width : 2 * width])
        self.in_proj[projections * width :].zero_()
        if self.wide_gain is not None:
            self.wide_gain.fill_(self.config.wide_gain_init)
        self.beta_bias.fill_(self.config.beta_bias_init)
        if self.lambda_proj is not None:  # λ starts input-independent at σ(lambda_bias_init)
            self.lambda_proj.zero_()
            self.lambda_bias.fill_(self.config.lambda_bias_init)
        if self.config.init == "ov_svd" and not self.wide:
            self._init_ov_svd(o_weight, v_weight, head_dim)
            return
        for delta, base in ((self.delta_q, q_weight), (self.delta_o, o_weight)):
            if delta is None:
                continue
            if self.config.init == "zero" or base is None:
                delta.zero_()
                continue
            if base.shape[1] < width:
                raise ValueError(f"base_slice init needs {width} input columns, the projection has {base.shape[1]}")
            cols = base[:, :width].to(delta.dtype)
            delta.copy_(F.normalize(cols, dim=0) * self.config.base_slice_scale)

    def _init_ov_svd(self, o_weight: Tensor | None, v_weight: Tensor | None, head_dim: int | None) -> None:
        """``scale · W_o^Δ W_v^m`` = the best rank-``N·r`` approximation of ``OV = o_proj ∘ repeat_kv ∘ v_proj``
        (biases left out), split as ``U√Σ`` / ``√Σ Vᵀ``; ``W_q^Δ = 0``."""
        if o_weight is None or v_weight is None or not head_dim:
            raise ValueError("init 'ov_svd' needs the layer's o_proj and v_proj weights and its head_dim")
        width = self.config.state_width
        w_v = v_weight.detach().float()
        kv = w_v.shape[0] // head_dim
        repeat = o_weight.shape[1] // w_v.shape[0]
        w_v = w_v.view(kv, 1, head_dim, -1).expand(kv, repeat, head_dim, w_v.shape[1]).reshape(-1, w_v.shape[1])
        ov = o_weight.detach().float() @ w_v  # (o_out, d)
        U, S, Vh = torch.linalg.svd(ov, full_matrices=False)
        root = S[:width].sqrt()
        self.in_proj[2 * width : 3 * width].copy_((root[:, None] * Vh[:width]).to(self.in_proj.dtype))
        if self.delta_o is not None:
            self.delta_o.copy_((U[:, :width] * root / self.scale).to(self.delta_o.dtype))
        if self.delta_q is not None:
            self.delta_q.zero_()

    # -- projections --------------------------------------------------------------------------------------------
    def project(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(B, T, d) → (B, T, 4·N·r)`` raw memory projections in ``dtype`` (the state's dtype). ``x`` may have
        another dtype than the weights (the mean hidden states of SSW are in the state's dtype)."""
        p = F.linear(x, _as(self.in_proj, x))
        return p if p.dtype == dtype else p.to(dtype)

    def activate_qk(self, qk: Tensor) -> Tensor:
        """``l2norm(tanh(·))`` over the last dim (the paper), or the raw projections (``normalize_qk=False``)."""
        if not self.config.normalize_qk:
            return qk
        return F.normalize(torch.tanh(qk), dim=-1, eps=L2_EPS)

    def split(self, p: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw projections ``(B, T, 4·N·r)`` → ``q, k, v, β`` each ``(B, T, N, r)``.

        Wide values: ``p (B, T, 2·N·r + N)`` and the attention input ``x (B, T, d)`` → ``q, k (B, T, N, r)``,
        ``v = x`` and ``β`` (one gate per sub-state, expanded over the rows) each ``(B, T, N, d)``."""
        B, T, _ = p.shape
        if self.wide:
            if x is None:
                raise ValueError("a wide-value layer needs the attention input x to split its projections")
            N, r, d = self.num_states, self.rank, x.shape[-1]
            qk = self.activate_qk(p[..., : 2 * N * r].view(B, T, 2, N, r))
            beta = torch.sigmoid(p[..., 2 * N * r :] + self.beta_bias.to(p.dtype))  # (B, T, N)
            v = x.to(p.dtype)[:, :, None, :].expand(B, T, N, d)
            return qk[:, :, 0], qk[:, :, 1], v, beta[..., None].expand(B, T, N, d)
        p = p.view(B, T, 4, self.num_states, self.rank)
        qk = self.activate_qk(p[:, :, :2])
        beta = torch.sigmoid(p[:, :, 3] + self.beta_bias.view(self.num_states, self.rank).to(p.dtype))
        return qk[:, :, 0], qk[:, :, 1], p[:, :, 2], beta

    def retention(self, x: Tensor, beta: Tensor) -> Tensor | None:
        """Per-row retention ``λ (B, T, N, r)`` for ``x (B, T, d)``, or None for the coupled ``1 − β``."""
        rule = self.config.update_rule
        if rule == "coupled":
            return None
        if rule == "delta":
            return torch.ones_like(beta)
        lam = torch.sigmoid(F.linear(x, _as(self.lambda_proj, x)).to(beta.dtype) + self.lambda_bias.to(beta.dtype))
        if self.wide:  # one retention per sub-state, shared by its rows
            return lam[..., None].expand(beta.shape)
        return lam.view(beta.shape)

    def erase_gate(self, beta: Tensor, decay: Tensor | None) -> Tensor | None:
        """The erase gate ``ε (B, T, N, r)``, or None for ``ε = β`` (the paper). The authors' ``lambda_outside``:
        ``ε = λ ⊙ β`` with ``λ = decay`` (``1 − β`` when None)."""
        if self.config.state_update_mode != "lambda_outside":
            return None
        return (1 - beta if decay is None else decay) * beta

    def gates(self, x: Tensor, beta: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(decay, erase)`` for the ops (None: the paper's ``1 − β`` / ``β``)."""
        decay = self.retention(x, beta)
        return decay, self.erase_gate(beta, decay)

    def query(self, p: Tensor) -> Tensor:
        """Only the read query ``(B, T, N, r)`` from raw projections (writes off)."""
        B, T, _ = p.shape
        q = p[..., : self.num_states * self.rank].reshape(B, T, self.num_states, self.rank)
        return self.activate_qk(q)


    # -- one forward call: the entry points of the model's hooks ------------------------------------------------
    def attend_query(
        self, x: Tensor, out: Tensor, memory: Tensor, pending: Tensor | None, call: MemoryCall
    ) -> tuple[Tensor | None, Any, Tensor, Tensor | None]:
        """The ``q_proj`` side of one forward call: read (and, with writes on, write) the memory and steer
        ``q_proj``'s output by ``(α/r)·W_q^Δ r``.

        Args:
            x: ``(B, T, d)`` the attention input (``q_proj``'s input). out: ``(B, T, q_out)`` ``q_proj``'s output.
            memory: the layer's state before the call, ``(B, N, r, r)`` (``(B, N, d, r)`` with wide values).
            pending: SSW (our semantics): ``(B, 4·N·r)`` the open message's projection sum; otherwise None.
            call: the call's :class:`MemoryCall`.
        Returns:
            ``(new_out, read, memory, pending)``: the steered output, or None when ``out`` stands (steered in place,
            or not steered); what :meth:`attend_output` needs (None: nothing to add there); the new state; the new
            pending sum (None unless SSW, our semantics).
        """
        if memory.device != x.device:  # a model spread over devices: the state lives with the first layer
            memory = memory.to(x.device)
        mask = call.write_mask
        if mask is not None and mask.device != x.device:
            mask = mask.to(x.device)
        impl, grad = self.kernels.choose(x, memory, call.form, out, self._parameters)
        steer = not call.writes or self.config.steer_writes
        if impl == NUMBA_DECODE and steer and out.is_contiguous():
            w = self._fast_weights(torch.float32, call)
            reads, memory = self._numba_decode(x, memory, mask, w, out)  # steers out in place when W_q^Δ exists
            return None, (None if w.delta_o_t is None else (reads, w.delta_o_t)), memory, pending
        reads, memory, pending = self._run(impl, x, memory, pending, mask, call)
        if not steer:
            return None, None, memory, pending  # write only: the base runs unchanged (steer_writes=False)
        if self.wide:
            return None, reads, memory, pending  # a wide read decodes on the o side only
        if grad:
            reads = reads.to(out.dtype)
            new_out = None if self.delta_q is None else self.correct(out, reads, self.delta_q)
            return new_out, (None if self.delta_o is None else reads), memory, pending
        # inference: steer in place with cached transposed weights (no new (B, T, q_out) tensor)
        w = self._fast_weights(out.dtype, call)
        flat = reads.reshape(-1, reads.shape[-1]).to(out.dtype)
        new_out = None
        if w.delta_q_t is not None and not self.steer_(out, flat, w.delta_q_t):
            new_out = self.correct(out, flat.view(*out.shape[:2], -1), self.delta_q)
        return new_out, (None if w.delta_o_t is None else (flat, w.delta_o_t)), memory, pending

    def attend_output(self, out: Tensor, read: Any) -> Tensor | None:
        """The ``o_proj`` side: add ``(α/r)·W_o^Δ r`` (or the wide read's decoding) to ``out (B, T, o_out)``.
        ``read`` is what :meth:`attend_query` returned for this call. Returns the new output, or None when ``out``
        stands (steered in place)."""
        if self.wide:
            return self.wide_output(out, read, *self._wide_decoder)
        if type(read) is tuple:  # inference: (reads (B·T, N·r) in out's dtype, W_o^Δᵀ)
            flat, delta_o_t = read
            if self.steer_(out, flat, delta_o_t):
                return None
            read = flat.view(*out.shape[:2], -1)
        return self.correct(out, read.to(out.dtype), self.delta_o)

    def set_wide_decoder(self, v_weight: Tensor, o_weight: Tensor, head_dim: int) -> None:
        """The frozen ``v_proj``/``o_proj`` weights (and head_dim) that decode a wide read (wide values only)."""
        self._wide_decoder = (v_weight, o_weight, int(head_dim))

    def set_kernel(self, kernel: str) -> None:
        """The kernel preference: ``auto``, ``torch``, ``numba`` or ``triton`` (see :mod:`.kernel_choice`)."""
        self.kernels.set_preference(kernel)

    # -- the forms of a call (each asks the kernel choice, then runs what it picked) ----------------------------
    def read_only(self, x: Tensor, memory: Tensor) -> Tensor:
        """Every token reads the fixed state. ``x (B,T,d)``, ``memory (B,N,r,r)`` → reads ``(B,T,N·r)`` in the
        state's dtype."""
        q = self.query(self.project(x, memory.dtype))
        out = torch.einsum("bnij,btnj->btni", memory, q)
        if self.wide:  # (B, T, N, d): the sub-states' reads add up in the hidden space
            return out.sum(2)
        return out.reshape(*out.shape[:2], -1)

    def token_write(self, x: Tensor, memory: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """TSW/MSW: read then write at every unmasked token, by whichever implementation the kernel choice picks.

        Args:
            x: ``(B, T, d)`` attention input. memory: ``(B, N, r, r)``. mask: ``(B, T)`` bool or None.
        Returns:
            reads ``(B, T, N·r)`` (the state's dtype) and the new memory ``(B, N, r, r)``.
        """
        impl, _ = self.kernels.choose(x, memory, TOKENS, None, self._parameters)
        reads, memory, _ = self._run(impl, x, memory, None, mask, None)
        return reads, memory

    def sequence_write(
        self, x: Tensor, memory: Tensor, pending_sum: Tensor, plan: SegmentPlan
    ) -> tuple[Tensor, Tensor, Tensor]:
        """SSW: one write per closed message (see :mod:`.segments`).

        Args:
            x: ``(B, T, d)``. memory: ``(B, N, r, r)``. pending_sum: ``(B, 4·N·r)`` projections of the open message.
        Returns:
            reads ``(B, T, N·r)``, new memory, new pending_sum.
        """
        impl, _ = self.kernels.choose(x, memory, SEQUENCE, None, self._parameters)
        return self._sequence_write(x, memory, pending_sum, plan, impl == TRITON_SCAN)

    def message_write(self, x: Tensor, memory: Tensor, plan: MessageWritePlan) -> tuple[Tensor, Tensor]:
        """SSW with the authors' semantics (``ssw_semantics="official"``): every token reads ``memory`` (the state
        at the start of the call); then each message of the call is written once, in ascending id order, with
        the memory projections of the mean of its tokens' hidden states.

        Args:
            x: ``(B, T, d)``. memory: ``(B, N, r, r)``. plan: the call's :class:`MessageWritePlan`.
        Returns:
            reads ``(B, T, N·r)`` and the new memory.
        """
        impl, _ = self.kernels.choose(x, memory, MESSAGES, None, self._parameters)
        return self._message_write(x, memory, plan, impl == TRITON_SCAN)

    def _run(
        self, impl: str, x: Tensor, memory: Tensor, pending: Tensor | None, mask: Tensor | None,
        call: MemoryCall | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run the implementation ``impl`` picked for this call: ``(reads (B, T, width), memory, pending)``."""
        form = TOKENS if call is None else call.form
        triton = impl == TRITON_SCAN
        if form == READ:
            return self.read_only(x, memory), memory, pending
        if form == SEQUENCE:
            return self._sequence_write(x, memory, pending, call.plan, triton)
        if form == MESSAGES:
            return (*self._message_write(x, memory, call.message_plan, triton), pending)
        B, T, _ = x.shape
        if impl == NUMBA_DECODE:
            reads, memory = self._numba_decode(x, memory, mask, self._fast_weights(torch.float32, call), None)
        elif impl == NUMBA_SCAN:
            reads, memory = self._numba_scan(x, memory, mask, self._fast_weights(torch.float32, call))
        elif impl == TRITON_DECODE:
            reads, memory = self._triton_step(x, memory, mask, call)
        else:
            return (*self._scan_tokens(x, memory, mask, triton), pending)
        return reads.view(B, T, -1), memory, pending

    # -- the torch (and Triton scan) paths ------------------------------------------------------------------------
    def _scan_tokens(self, x: Tensor, memory: Tensor, mask: Tensor | None, triton: bool) -> tuple[Tensor, Tensor]:
        p = self.project(x, memory.dtype)
        q, k, v, beta = self.split(p, x)
        decay, erase = self.gates(x, beta)
        if self.wide:
            if x.shape[1] > 1:  # one gate per sub-state: the shared-gate chunked form (tested equal)
                out, memory = delta_rule_chunked_shared_gate(
                    q, k, v, beta[..., 0], memory, mask, chunk_size=self.config.chunk_size,
                    decay=None if decay is None else decay[..., 0])
            else:
                out, memory = delta_rule_step(q, k, v, beta, memory, mask, decay=decay)
            return out.sum(2), memory
        out, memory = self._scan(q, k, v, beta, memory, mask, decay, erase, triton)
        return out.reshape(*out.shape[:2], -1), memory

    def _scan(self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, memory: Tensor, mask: Tensor | None,
              decay: Tensor | None, erase: Tensor | None, triton: bool) -> tuple[Tensor, Tensor]:
        """The delta rule over ``(B, T, N, r)`` inputs by the ops' contract: Triton's scan, or the torch step
        (``T == 1``) / chunked form."""
        if triton:
            scan = triton_modules().scan
            if erase is None:
                return scan.delta_rule_triton(q, k, v, beta, memory, mask, decay=decay)
            keep = 1 - beta if decay is None else decay
            return scan.delta_rule_triton_affine(q, k, v, keep, erase, beta, memory, mask)
        if q.shape[1] == 1:
            return delta_rule_step(q, k, v, beta, memory, mask, decay=decay, erase=erase)
        return delta_rule_chunked(q, k, v, beta, memory, mask, chunk_size=self.config.chunk_size, decay=decay,
                                  erase=erase)

    def _sequence_write(
        self, x: Tensor, memory: Tensor, pending_sum: Tensor, plan: SegmentPlan, triton: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        p = self.project(x, memory.dtype)
        B, T, W = p.shape
        N, r = self.num_states, self.rank
        pending_sum = pending_sum.to(p.device, p.dtype)
        sums = torch.zeros(B, plan.num_slots, W, device=p.device, dtype=p.dtype)
        sums = sums.scatter_add(1, plan.token_slot[..., None].expand(B, T, W), p * plan.mask[..., None])
        sums = torch.cat([sums[:, :1] + pending_sum[:, None], sums[:, 1:]], dim=1)
        means = sums / plan.counts.clamp_min(1.0)[..., None]
        _, k_w, v_w, beta_w = self.split(means)
        beta_w = beta_w * plan.write_valid[..., None, None]
        decay_w = torch.ones_like(beta_w) if self.config.update_rule == "delta" else None
        erase_w = self.erase_gate(beta_w, decay_w)

        ext = plan.ext_len + 1  # one extra, discarded dump position for slots not written in this call
        q_tok = self.query(p)
        q_ext = p.new_zeros(B, ext, N, r).scatter(1, plan.token_pos[..., None, None].expand(B, T, N, r), q_tok)
        wpos = plan.write_pos[..., None, None].expand(B, plan.num_slots, N, r)
        k_ext = p.new_zeros(B, ext, N, r).scatter(1, wpos, k_w)
        v_ext = p.new_zeros(B, ext, N, r).scatter(1, wpos, v_w)
        b_ext = p.new_zeros(B, ext, N, r).scatter(1, wpos, beta_w)
        e_ext = None if erase_w is None else p.new_zeros(B, ext, N, r).scatter(1, wpos, erase_w)
        mask_ext = torch.zeros(B, ext, dtype=torch.bool, device=p.device).scatter(1, plan.write_pos, plan.write_valid)
        cut = slice(0, plan.ext_len)
        out, memory = self._scan(
            q_ext[:, cut], k_ext[:, cut], v_ext[:, cut], b_ext[:, cut], memory, mask_ext[:, cut],
            torch.ones_like(b_ext[:, cut]) if self.config.update_rule == "delta" else None,
            None if e_ext is None else e_ext[:, cut], triton,
        )
        reads = out.gather(1, plan.token_pos[..., None, None].expand(B, T, N, r))
        pending = sums.gather(1, plan.last_slot[:, None, None].expand(B, 1, W))[:, 0]
        return reads.reshape(B, T, N * r), memory, pending

    def _message_write(self, x: Tensor, memory: Tensor, plan: MessageWritePlan, triton: bool) -> tuple[Tensor, Tensor]:
        p = self.project(x, memory.dtype)
        B, T, _ = p.shape
        q = self.query(p)
        reads = torch.einsum("bnij,btnj->btni", memory, q).reshape(B, T, -1)
        d = x.shape[-1]
        sums = torch.zeros(B, plan.num_slots + 1, d, device=x.device, dtype=p.dtype)  # last slot: tokens not written
        sums = sums.scatter_add(1, plan.token_slot[..., None].expand(B, T, d), x.to(p.dtype))
        means = sums[:, :-1] / plan.counts.clamp_min(1.0).to(p.dtype)[..., None]
        p_w = self.project(means, memory.dtype)
        _, k_w, v_w, beta_w = self.split(p_w)
        decay_w, erase_w = self.gates(means, beta_w)
        _, memory = self._scan(k_w.new_zeros(k_w.shape), k_w, v_w, beta_w, memory, plan.write_valid, decay_w, erase_w,
                               triton)
        return reads, memory

    # -- the compiled CPU kernel and the fused Triton decode step (inference only) --------------------------------
    def _numba_decode(self, x: Tensor, memory: Tensor, mask: Tensor | None, w: _FastWeights,
                      out_q: Tensor | None) -> tuple[Tensor, Tensor]:
        """One position per row in one compiled call: projection, activations, read, write and — when ``out_q``
        (``q_proj``'s contiguous output) is given and ``W_q^Δ`` exists — the query steering, in place.
        ``x (B, 1, d)`` float32 CPU → reads ``(B, N·r)`` and the new memory. Same math as the torch path."""
        B, _, d = x.shape
        wq_t = w.delta_q_t if out_q is not None else None
        return _cpu_kernel.decode_write_steer_(
            x.view(B, d) if x.is_contiguous() else x.reshape(B, d).contiguous(), w.in_t, w.bias_np, memory, mask,
            None if wq_t is None else out_q.view(B, -1), wq_t, self.scale, self.num_states, self.rank,
            self.kernels.numba_rule, self.config.normalize_qk,
        )

    def _numba_scan(self, x: Tensor, memory: Tensor, mask: Tensor | None, w: _FastWeights) -> tuple[Tensor, Tensor]:
        """TSW/MSW read + write for inference: torch projection, then one compiled call (activations + scan).
        ``x (B, T, d)`` float32 CPU → reads ``(B, T, N·r)`` and the new memory."""
        B, T, d = x.shape
        p = torch.mm(x.reshape(B * T, d), w.in_t).view(B, T, -1)
        return _cpu_kernel.fused_write_unchecked(p, w.bias_np, memory, None if mask is None else mask.contiguous(),
                                                 self.num_states, self.rank, self.kernels.numba_rule,
                                                 self.config.normalize_qk)

    def _triton_step(self, x: Tensor, memory: Tensor, mask: Tensor | None,
                     call: MemoryCall | None) -> tuple[Tensor, Tensor]:
        """One position per row: the projection as one GEMM in the hidden states' dtype (bf16 on a GPU, fp32
        accumulation), then one fused Triton kernel (activations, read, write; float32 state). No host sync.
        ``x (B, 1, d)`` → reads ``(B, N·r)`` float32 and the new memory ``(B, N, r, r)`` float32."""
        dtype = x.dtype if x.dtype in _HALF_OR_SINGLE else memory.dtype
        w = self._fast_weights(dtype, call)
        B = x.shape[0]
        x2 = x.reshape(B, -1).to(dtype)
        p = torch.mm(x2, w.in_t)
        decay = None
        if self.lambda_proj is not None:  # decoupled: λ from its own projection, activated here
            decay = torch.sigmoid(F.linear(x2, _as(self.lambda_proj, x2)).float() + self.lambda_bias.float())
        return triton_modules().decode.delta_rule_decode_triton(
            p, self.beta_bias, memory.contiguous(), mask, num_states=self.num_states, rank=self.rank, decay=decay,
            update=self.kernels.triton_update, normalize_qk=self.config.normalize_qk,
        )

    def _fast_weights(self, dtype: torch.dtype, call: MemoryCall | None = None) -> _FastWeights:
        """Contiguous transposed copies of the weights in ``dtype`` (the base's compute dtype), rebuilt when a
        parameter changes.

        Why: ``addmm`` with a transposed (non-contiguous) weight costs 2× on a 1-token CPU call, and the decode hot
        path runs 60 of them per token; on a GPU, casting the float32 weights to bf16 would be one more launch per
        use. Keyed on the dtype and the identity, data pointer and version counter of every parameter (through the
        kernel choice's weights generation, checked once per forward call ``call`` for all layers), so stale copies
        are never used.
        """
        if call is not None:
            key = (dtype, self.kernels.weights_generation(call))
        else:  # a call from outside the model's forward: this layer's own parameters, every time
            params = [p for p in self._parameters.values() if p is not None]
            key = (dtype, tuple([(id(p), p._version, p.data_ptr()) for p in params]))
        cached = self._fast_cache
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cpu32 = dtype == torch.float32 and self.in_proj.device.type == "cpu"
                weights = _FastWeights(
                    self.in_proj.detach().to(dtype).t().contiguous(),
                    self.beta_bias.detach().float().contiguous().numpy() if cpu32 else None,
                    None if self.delta_q is None else self.delta_q.detach().to(dtype).t().contiguous(),
                    None if self.delta_o is None else self.delta_o.detach().to(dtype).t().contiguous(),
                )
            cached = self._fast_cache = (key, weights)
        return cached[1]

    def steer_(self, out: Tensor, reads: Tensor, weight_t: Tensor | None) -> bool:
        """Add ``(α/r)·reads @ weight_t`` to ``out`` in place (inference only). ``out (B, T, D)``, ``reads
        (B·T, N·r)``, ``weight_t (N·r, D)`` a transposed correction of :meth:`_fast_weights`, all one dtype.
        Returns False (nothing done) when the branch is not corrected or ``out`` is not contiguous."""
        if weight_t is None or not out.is_contiguous():
            return False
        out.view(-1, out.shape[-1]).addmm_(reads, weight_t, alpha=self.scale)
        return True

    # -- steering -----------------------------------------------------------------------------------------------
    def wide_output(self, out: Tensor, reads: Tensor, v_weight: Tensor, o_weight: Tensor, head_dim: int) -> Tensor:
        """``out + g · o_proj(repeat_kv(v_proj(m)))`` without the projections' biases (so ``m = 0`` adds exactly
        0). ``out (B, T, D)``, ``reads m (B, T, d)``; frozen ``v_weight (kv·hd, d)`` and ``o_weight (D, H·hd)``."""
        B, T, _ = reads.shape
        values = F.linear(reads.to(v_weight.dtype), v_weight)  # what v_proj makes of the remembered states
        kv_repeat = o_weight.shape[1] // values.shape[-1]
        if kv_repeat > 1:  # grouped-query attention: each kv head serves kv_repeat query heads, in order
            kv_heads = values.shape[-1] // head_dim
            values = values.view(B, T, kv_heads, 1, head_dim).expand(B, T, kv_heads, kv_repeat, head_dim)
            values = values.reshape(B, T, -1)
        return out + self.wide_gain.to(out.dtype) * F.linear(values, o_weight).to(out.dtype)

    def correct(self, out: Tensor, reads: Tensor, delta: Tensor) -> Tensor:
        """``out + (α/r)·reads @ deltaᵀ`` in one fused op, in ``out``'s dtype (the float32 ``delta`` is cast: its
        gradient still reaches the float32 parameter). ``out (B,T,D)``, ``reads (B,T,N·r)`` in ``out``'s dtype."""
        shape = out.shape
        fused = torch.addmm(out.reshape(-1, shape[-1]), reads.reshape(-1, reads.shape[-1]), _as(delta, out).t(),
                            alpha=self.scale)
        return fused.view(shape)


@dataclass(frozen=True)
class _FastWeights:
    """Weight copies of the inference paths (see :meth:`DeltaMemLayer._fast_weights`): ``in_t (d, 4·N·r)``, the
    gate bias as a float32 numpy array (float32 CPU only, for the compiled kernel), ``delta_q_t (N·r, q_out)`` and
    ``delta_o_t (N·r, o_out)`` (None where the branch is not corrected)."""

    in_t: Tensor
    bias_np: np.ndarray | None
    delta_q_t: Tensor | None
    delta_o_t: Tensor | None


def _as(weight: Tensor, x: Tensor) -> Tensor:
    """``weight`` in the dtype of ``x`` (a no-op, the usual case, when they match)."""
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)
