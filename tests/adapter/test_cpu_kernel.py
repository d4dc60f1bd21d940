"""The layer's compiled CPU kernel (numba; private: ``adapter/_cpu_kernel.py``) against the per-token reference and
the layer's differentiable torch path: every rule it covers, raw queries/keys, masks, odd lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltamem_agents.adapter import DeltaMemConfig, _cpu_kernel
from deltamem_agents.adapter.layer import DeltaMemLayer
from deltamem_agents.ops import delta_rule_reference

pytestmark = pytest.mark.skipif(not _cpu_kernel.AVAILABLE, reason="numba not installed")

F32 = dict(atol=2e-5, rtol=1e-4)


def _mask(kind, B, T, seed=0):
    if kind is None:
        return None
    if kind == "left":  # left padding: row b starts with b * T // (2 B) pads (row 0 unpadded)
        starts = torch.tensor([b * T // (2 * B) for b in range(B)])
        return torch.arange(T)[None, :] >= starts[:, None]
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 1)) > 0.3


def _activated(p, bias, N, r, normalize):
    """The kernel's activations in torch (float64): q, k (l2norm∘tanh or raw), v, β."""
    B, T, _ = p.shape
    x = p.double().view(B, T, 4, N, r)
    qk = F.normalize(torch.tanh(x[:, :, :2]), dim=-1, eps=1e-6) if normalize else x[:, :, :2]
    beta = torch.sigmoid(x[:, :, 3] + bias.double().view(N, r))
    return qk[:, :, 0], qk[:, :, 1], x[:, :, 2], beta


@pytest.mark.parametrize("rule", ["coupled", "lambda_outside", "delta"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("T", "N", "r"), [(1, 1, 8), (7, 4, 8), (63, 1, 16), (100, 4, 8), (257, 1, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_rules_match_reference(rule, normalize, T, N, r, masked):
    g = torch.Generator().manual_seed(T + N + r)
    scale = 1.0 if normalize else 0.25  # raw keys: keep β‖k‖² small enough that the rule stays stable
    p = torch.randn(2, T, 4 * N * r, generator=g) * scale
    bias = torch.randn(N * r, generator=g)
    memory = torch.randn(2, N, r, r, generator=g) * 0.3
    mask = (torch.rand(2, T, generator=g) > 0.3) if masked else None
    code = _cpu_kernel.kernel_rule("delta" if rule == "delta" else "coupled",
                                   "lambda_outside" if rule == "lambda_outside" else "standard")
    reads, state = _cpu_kernel.delta_rule_fused_cpu(p, bias, memory, mask, N, r, rule=code, normalize_qk=normalize)
    q, k, v, beta = _activated(p, bias, N, r, normalize)
    decay = torch.ones_like(beta) if rule == "delta" else None
    erase = (1 - beta) * beta if rule == "lambda_outside" else None
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, memory.double(), mask, decay=decay, erase=erase)
    torch.testing.assert_close(reads.double(), ref_out.reshape(2, T, N * r), **F32)
    torch.testing.assert_close(state.double(), ref_s, **F32)


def test_kernel_rule_codes():
    assert _cpu_kernel.kernel_rule("coupled") == _cpu_kernel.RULE_COUPLED
    assert _cpu_kernel.kernel_rule("coupled", "lambda_outside") == _cpu_kernel.RULE_LAMBDA_OUTSIDE
    assert _cpu_kernel.kernel_rule("delta", "lambda_outside") == _cpu_kernel.RULE_DELTA  # λ = 1: the same rule
    assert _cpu_kernel.kernel_rule("decoupled") is None  # needs the λ projection: the torch paths run


def _layer(N, r, seed=0):
    cfg = DeltaMemConfig(rank=r, write_mode="msw" if N > 1 else "tsw", num_states=N if N > 1 else None)
    layer = DeltaMemLayer(48, 48, 48, cfg, kernel="auto")
    torch.manual_seed(seed)
    layer.reset_parameters()
    with torch.no_grad():
        layer.in_proj.mul_(3.0)  # larger pre-activations: exercise tanh saturation and varied gates
        layer.beta_bias.normal_()
    return layer


@pytest.mark.parametrize("mask_kind", [None, "left", "random"])
@pytest.mark.parametrize("T,N,r", [(1, 1, 8), (7, 4, 8), (100, 1, 16), (257, 4, 8)])
def test_layer_token_write_kernel_matches_torch_path(T, N, r, mask_kind):
    """The layer's token write without gradients (the kernel choice picks the compiled kernel: decode variant at
    T = 1, scan variant otherwise) equals its differentiable torch path."""
    layer = _layer(N, r)
    x = torch.randn(2, T, 48)
    memory = torch.randn(2, N, r, r) * 0.5
    mask = _mask(mask_kind, 2, T)
    reads_ref, mem_ref = layer.token_write(x, memory, mask)  # grad enabled: the torch path
    assert reads_ref.requires_grad and layer.kernels.calls["torch"] == 1
    with torch.no_grad():
        reads, mem = layer.token_write(x, memory, mask)
        p = F.linear(x, layer.in_proj)
        reads_kw, mem_kw = _cpu_kernel.delta_rule_fused_cpu(p, layer.beta_bias, memory, mask, N, r)
    assert layer.kernels.calls["numba-decode" if T == 1 else "numba-scan"] == 1
    torch.testing.assert_close(reads, reads_ref.detach(), **F32)
    torch.testing.assert_close(mem, mem_ref.detach(), **F32)
    # same kernel; the projection differs only in matmul rounding (F.linear vs mm with a transposed copy)
    torch.testing.assert_close(reads_kw, reads, **F32)
    torch.testing.assert_close(mem_kw, mem, **F32)


def test_masked_positions_write_nothing():
    layer = _layer(1, 8)
    memory = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for T in (1, 9):
            _, mem = layer.token_write(torch.randn(1, T, 48), memory, torch.zeros(1, T, dtype=torch.bool))
            assert torch.equal(mem, memory)
    assert layer.kernels.calls == {"numba-decode": 1, "numba-scan": 1}


def test_kernel_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shape mismatch"):
        _cpu_kernel.delta_rule_fused_cpu(torch.randn(1, 3, 31), torch.zeros(8), torch.zeros(1, 1, 8, 8), None, 1, 8)
    with pytest.raises(ValueError, match="float32"):
        _cpu_kernel.delta_rule_fused_cpu(torch.randn(1, 3, 32).double(), torch.zeros(8), torch.zeros(1, 1, 8, 8),
                                         None, 1, 8)
    with pytest.raises(ValueError, match="rule"):
        _cpu_kernel.delta_rule_fused_cpu(torch.randn(1, 2, 32), torch.zeros(8), torch.zeros(1, 1, 8, 8), None, 1, 8,
                                         rule=7)
