"""`DeltaMemLayer`: the trainable δ-mem weights of one attention layer and the read/write computation.

Per position ``t`` with hidden state ``x_t`` (the input of ``q_proj``, i.e. after the layer's input norm):

    [q̂; k̂; v; b] = W_in x_t                  one fused (4·N·r × d) matmul for the four memory projections
    q_t = l2norm(tanh(q̂)), k_t = l2norm(tanh(k̂))   per sub-state
    β_t = σ(b + b_β)
    r_t = S_{t-1} q_t                        read the old state (N sub-states, reads concatenated → N·r)
    S_t = Diag(1-β_t) S_{t-1} + Diag(β_t)(v_t - S_{t-1} k_t) k_tᵀ

and the attention branches are steered by ``(α/r)·W_q^Δ r_t`` (added to the output of ``q_proj``) and
``(α/r)·W_o^Δ r_t`` (added to the output of ``o_proj``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import delta_rule_chunked, delta_rule_step
from .config import DeltaMemConfig
from .segments import SegmentPlan

L2_EPS = 1e-6


class DeltaMemLayer(nn.Module):
    """δ-mem weights of one attention layer.

    Parameters (names are the on-disk tensor names under ``layers.{i}.``):
        in_proj: ``(4·N·r, d)`` rows ``[W_q^m; W_k^m; W_v^m; W_β]``, each block ``(N·r, d)``.
        beta_bias: ``(N·r,)`` write-gate bias ``b_β``.
        delta_q: ``(q_out, N·r)`` correction of the query branch (absent when ``"q"`` is not corrected).
        delta_o: ``(o_out, N·r)`` correction of the output branch (absent when ``"o"`` is not corrected).
    """

    def __init__(self, hidden_size: int, q_out: int, o_out: int, config: DeltaMemConfig) -> None:
        super().__init__()
        self.config = config
        self.num_states = config.num_states
        self.rank = config.rank
        self.scale = config.scale
        width = config.state_width
        self.in_proj = nn.Parameter(torch.empty(4 * width, hidden_size))
        self.beta_bias = nn.Parameter(torch.empty(width))
        self.delta_q = nn.Parameter(torch.empty(q_out, width)) if "q" in config.branches else None
        self.delta_o = nn.Parameter(torch.empty(o_out, width)) if "o" in config.branches else None

    @torch.no_grad()
    def reset_parameters(self, q_weight: Tensor | None = None, o_weight: Tensor | None = None) -> None:
        """Initialise as the brief says: W^m Kaiming-uniform, W_β = 0, b_β = beta_bias_init, W^Δ zero or base slice."""
        width = self.config.state_width
        for block in self.in_proj.split(width, dim=0)[:3]:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # nn.Linear's default
        self.in_proj[3 * width :].zero_()
        self.beta_bias.fill_(self.config.beta_bias_init)
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

    # -- projections --------------------------------------------------------------------------------------------
    def project(self, x: Tensor) -> Tensor:
        """``(B, T, d) → (B, T, 4·N·r)`` raw memory projections, float32."""
        p = F.linear(x, self.in_proj)
        return p if p.dtype == torch.float32 else p.float()

    def split(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw projections ``(B, T, 4·N·r)`` → ``q, k, v, β`` each ``(B, T, N, r)``."""
        B, T, _ = p.shape
        p = p.view(B, T, 4, self.num_states, self.rank)
        qk = F.normalize(torch.tanh(p[:, :, :2]), dim=-1, eps=L2_EPS)
        beta = torch.sigmoid(p[:, :, 3] + self.beta_bias.view(self.num_states, self.rank).float())
        return qk[:, :, 0], qk[:, :, 1], p[:, :, 2], beta

    def query(self, p: Tensor) -> Tensor:
        """Only the read query ``(B, T, N, r)`` from raw projections (writes off)."""
        B, T, _ = p.shape
        q = p.view(B, T, 4, self.num_states, self.rank)[:, :, 0]
        return F.normalize(torch.tanh(q), dim=-1, eps=L2_EPS)

    # -- read and write -----------------------------------------------------------------------------------------
    def read_only(self, x: Tensor, memory: Tensor) -> Tensor:
        """Every token reads the fixed state. ``x (B,T,d)``, ``memory (B,N,r,r)`` → reads ``(B,T,N·r)`` float32."""
        q = self.query(self.project(x))
        out = torch.einsum("bnij,btnj->btni", memory, q)
        return out.reshape(*out.shape[:2], -1)

    def token_write(self, x: Tensor, memory: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """TSW/MSW: read then write at every unmasked token.

        Args:
            x: ``(B, T, d)`` attention input. memory: ``(B, N, r, r)``. mask: ``(B, T)`` bool or None.
        Returns:
            reads ``(B, T, N·r)`` float32 and the new memory ``(B, N, r, r)``.
        """
        q, k, v, beta = self.split(self.project(x))
        if x.shape[1] == 1:
            out, memory = delta_rule_step(q, k, v, beta, memory, mask)
        else:
            out, memory = delta_rule_chunked(q, k, v, beta, memory, mask, chunk_size=self.config.chunk_size)
        return out.reshape(*out.shape[:2], -1), memory

    def sequence_write(
        self, x: Tensor, memory: Tensor, pending_sum: Tensor, plan: SegmentPlan
    ) -> tuple[Tensor, Tensor, Tensor]:
        """SSW: one write per closed message (see :mod:`.segments`).

        Args:
            x: ``(B, T, d)``. memory: ``(B, N, r, r)``. pending_sum: ``(B, 4·N·r)`` projections of the open message.
        Returns:
            reads ``(B, T, N·r)``, new memory, new pending_sum.
        """
        p = self.project(x)
        B, T, W = p.shape
        N, r = self.num_states, self.rank
        sums = torch.zeros(B, plan.num_slots, W, device=p.device, dtype=p.dtype)
        sums = sums.scatter_add(1, plan.token_slot[..., None].expand(B, T, W), p * plan.mask[..., None])
        sums = torch.cat([sums[:, :1] + pending_sum[:, None], sums[:, 1:]], dim=1)
        means = sums / plan.counts.clamp_min(1.0)[..., None]
        _, k_w, v_w, beta_w = self.split(means)
        beta_w = beta_w * plan.write_valid[..., None, None]

        ext = plan.ext_len + 1  # one extra, discarded dump position for slots not written in this call
        q_tok = self.query(p)
        q_ext = p.new_zeros(B, ext, N, r).scatter(1, plan.token_pos[..., None, None].expand(B, T, N, r), q_tok)
        wpos = plan.write_pos[..., None, None].expand(B, plan.num_slots, N, r)
        k_ext = p.new_zeros(B, ext, N, r).scatter(1, wpos, k_w)
        v_ext = p.new_zeros(B, ext, N, r).scatter(1, wpos, v_w)
        b_ext = p.new_zeros(B, ext, N, r).scatter(1, wpos, beta_w)
        mask_ext = torch.zeros(B, ext, dtype=torch.bool, device=p.device).scatter(1, plan.write_pos, plan.write_valid)
        cut = slice(0, plan.ext_len)
        out, memory = delta_rule_chunked(
            q_ext[:, cut], k_ext[:, cut], v_ext[:, cut], b_ext[:, cut], memory, mask_ext[:, cut],
            chunk_size=self.config.chunk_size,
        )
        reads = out.gather(1, plan.token_pos[..., None, None].expand(B, T, N, r))
        pending = sums.gather(1, plan.last_slot[:, None, None].expand(B, 1, W))[:, 0]
        return reads.reshape(B, T, N * r), memory, pending

    # -- steering -----------------------------------------------------------------------------------------------
    def correct(self, out: Tensor, reads: Tensor, delta: Tensor) -> Tensor:
        """``out + (α/r)·reads @ deltaᵀ`` in one fused op. ``out (B,T,D)``, ``reads (B,T,N·r)``."""
        shape = out.shape
        fused = torch.addmm(out.reshape(-1, shape[-1]), reads.reshape(-1, reads.shape[-1]), delta.t(), alpha=self.scale)
        return fused.view(shape)
