"""The compiled CPU kernels (numba) against the per-token reference and the torch paths."""

from __future__ import annotations

import pytest
import torch
from test_delta_rule import F32_TOL, F64_TOL, assert_close, make_inputs, make_mask

from deltamem_agents.adapter import DeltaMemConfig
from deltamem_agents.adapter.layer import DeltaMemLayer
from deltamem_agents.ops import cpu_fused, delta_rule_fused_cpu, delta_rule_numba, delta_rule_reference

pytestmark = pytest.mark.skipif(not cpu_fused.AVAILABLE, reason="numba not installed (or DELTAMEM_KERNEL=torch)")


@pytest.mark.parametrize("mask_kind", [None, "left", "random"])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("r", [8, 16])
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("T", [1, 7, 63, 100, 257])
def test_numba_scan_matches_reference(T, N, r, with_init, mask_kind):
    q, k, v, beta, s0 = make_inputs(2, T, N, r)
    mask = make_mask(mask_kind, 2, T)
    init = s0 if with_init else None
    out_ref, s_ref = delta_rule_reference(q, k, v, beta, init, mask)
    out, s = delta_rule_numba(q, k, v, beta, init, mask)
    assert_close(out, out_ref, F64_TOL)
    assert_close(s, s_ref, F64_TOL)
    if init is not None:
        assert torch.equal(init, s0), "the initial state must not be modified"


@pytest.mark.parametrize("mask_kind", [None, "left", "random"])
@pytest.mark.parametrize("T,N,r", [(1, 1, 8), (7, 4, 8), (100, 1, 16), (257, 4, 8)])
def test_fused_layer_kernel_matches_torch_path(T, N, r, mask_kind):
    """Activations + scan in one call equal DeltaMemLayer's differentiable torch path (split + chunked/step)."""
    cfg = DeltaMemConfig(rank=r, write_mode="msw" if N == 4 else "tsw")
    layer = DeltaMemLayer(48, 48, 48, cfg)
    torch.manual_seed(0)
    layer.reset_parameters()
    with torch.no_grad():
        layer.in_proj.mul_(3.0)  # larger pre-activations: exercise tanh saturation and varied gates
        layer.beta_bias.normal_()
    x = torch.randn(2, T, 48)
    memory = torch.randn(2, N, r, r) * 0.5
    mask = make_mask(mask_kind, 2, T)
    reads_ref, mem_ref = layer.token_write(x, memory, mask)  # grad enabled: the torch path
    assert reads_ref.requires_grad
    with torch.no_grad():
        reads, mem = layer.fast_token_write(x, memory, mask)
        reads_kw, mem_kw = delta_rule_fused_cpu(layer.project(x), layer.beta_bias, memory, mask, N, r)
    assert_close(reads.view_as(reads_ref), reads_ref.detach(), F32_TOL)
    assert_close(mem, mem_ref.detach(), F32_TOL)
    # same kernel; the projection differs only in matmul rounding (F.linear vs mm with a transposed copy)
    assert_close(reads_kw.view(-1, N * r), reads, F32_TOL)
    assert_close(mem_kw, mem, F32_TOL)


def test_fused_kernel_masked_positions_write_nothing():
    cfg = DeltaMemConfig()
    layer = DeltaMemLayer(32, 32, 32, cfg)
    layer.reset_parameters()
    memory = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        _, mem = layer.fast_token_write(torch.randn(1, 9, 32), memory, torch.zeros(1, 9, dtype=torch.bool))
    assert torch.equal(mem, memory)


def test_fused_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        delta_rule_fused_cpu(torch.randn(1, 3, 31), torch.zeros(8), torch.zeros(1, 1, 8, 8), None, 1, 8)
    with pytest.raises(ValueError, match="float32"):
        delta_rule_fused_cpu(torch.randn(1, 3, 32).double(), torch.zeros(8), torch.zeros(1, 1, 8, 8), None, 1, 8)
