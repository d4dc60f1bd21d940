"""The layer's fused Triton decode step (private: ``adapter/_triton_decode.py``) against the torch activations +
per-token reference, and against the compiled CPU kernel (same raw-projection contract). CUDA when present,
otherwise Triton's interpreter on the CPU (``TRITON_INTERPRET=1``: tests/conftest.py sets it before triton is first
imported)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # for runs of this file alone: read when triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason='triton is not installed (pip install "deltamem-agents[cuda]")')

from deltamem_agents.adapter import _cpu_kernel  # noqa: E402
from deltamem_agents.adapter._triton_decode import delta_rule_decode_triton  # noqa: E402
from deltamem_agents.ops import delta_rule_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

TOL = dict(atol=2e-6, rtol=1e-5)


def make(B, N, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, 4 * N * r, generator=g)
    bias = torch.randn(N * r, generator=g) - 1.5
    state = 0.5 * torch.randn(B, N, r, r, generator=g)
    return p, bias, state


def torch_step(p, bias, state, mask, N, r, update="standard", decay=None, normalize_qk=True):
    """The same step from torch ops: the layer's activations, then the plain loop (float64)."""
    B = p.shape[0]
    x = p.double().view(B, 1, 4, N, r)
    q, k = x[:, :, 0], x[:, :, 1]
    if normalize_qk:
        q, k = (F.normalize(torch.tanh(t), dim=-1, eps=1e-6) for t in (q, k))
    v = x[:, :, 2]
    beta = torch.sigmoid(x[:, :, 3] + bias.double().view(N, r))
    lam = (1 - beta) if decay is None else decay.double().view(B, 1, N, r)
    m = None if mask is None else mask.view(B, 1)
    if update == "standard":
        out, new = delta_rule_reference(q, k, v, beta, state.double(), m, decay=None if decay is None else lam)
    else:  # the general update: retention `keep`, erase gate `erase`, write gate β
        keep = lam if update == "lambda_outside" else torch.ones_like(beta)
        erase = lam * beta if update == "lambda_outside" else beta
        out, new = delta_rule_reference(q, k, v, beta, state.double(), m, decay=keep, erase=erase)
    return out.reshape(B, N * r), new


@pytest.mark.parametrize("B,N,r", [(1, 1, 8), (3, 4, 8), (2, 2, 16), (2, 1, 5)])
def test_standard_step_matches_reference(B, N, r):
    p, bias, state = make(B, N, r)
    mask = torch.tensor([True, False, True][:B]) if B > 1 else None
    reads, new = delta_rule_decode_triton(p.to(DEVICE), bias.to(DEVICE), state.to(DEVICE),
                                          None if mask is None else mask.to(DEVICE), num_states=N, rank=r)
    ref_reads, ref_state = torch_step(p, bias, state, mask, N, r)
    assert reads.dtype == torch.float32 and new.dtype == torch.float32
    torch.testing.assert_close(reads.cpu().double(), ref_reads, **TOL)
    torch.testing.assert_close(new.cpu().double(), ref_state, **TOL)
    if mask is not None:  # a masked row keeps its state exactly
        assert torch.equal(new[1].cpu(), state[1])


@pytest.mark.skipif(not _cpu_kernel.AVAILABLE, reason="numba not installed")
def test_same_contract_as_the_compiled_cpu_kernel():
    p, bias, state = make(3, 4, 8, seed=1)
    mask = torch.tensor([[True], [False], [True]])
    reads, new = delta_rule_decode_triton(p.to(DEVICE), bias.to(DEVICE), state.to(DEVICE), mask.to(DEVICE),
                                          num_states=4, rank=8)
    c_reads, c_state = _cpu_kernel.delta_rule_fused_cpu(p.view(3, 1, -1), bias, state, mask, 4, 8)
    torch.testing.assert_close(reads.cpu(), c_reads.view(3, -1), **TOL)
    torch.testing.assert_close(new.cpu(), c_state, **TOL)


@pytest.mark.parametrize("update", ["standard", "lambda_outside", "no_lambda"])
@pytest.mark.parametrize("with_decay", [False, True])
def test_update_modes_and_decay(update, with_decay):
    if update == "no_lambda" and with_decay:
        pytest.skip("no_lambda refuses a decay (tested below)")
    B, N, r = 2, 2, 8
    p, bias, state = make(B, N, r, seed=2)
    decay = torch.sigmoid(torch.randn(B, N * r, generator=torch.Generator().manual_seed(3)) + 2) if with_decay else None
    reads, new = delta_rule_decode_triton(p.to(DEVICE), bias.to(DEVICE), state.to(DEVICE), num_states=N, rank=r,
                                          update=update, decay=None if decay is None else decay.to(DEVICE))
    ref_reads, ref_state = torch_step(p, bias, state, None, N, r, update=update, decay=decay)
    torch.testing.assert_close(reads.cpu().double(), ref_reads, **TOL)
    torch.testing.assert_close(new.cpu().double(), ref_state, **TOL)


def test_without_qk_normalisation():
    p, bias, state = make(2, 1, 8, seed=4)
    reads, new = delta_rule_decode_triton(p.to(DEVICE), bias.to(DEVICE), state.to(DEVICE), num_states=1, rank=8,
                                          normalize_qk=False)
    ref_reads, ref_state = torch_step(p, bias, state, None, 1, 8, normalize_qk=False)
    torch.testing.assert_close(reads.cpu().double(), ref_reads, **TOL)
    torch.testing.assert_close(new.cpu().double(), ref_state, atol=1e-5, rtol=1e-5)


def test_in_place_state_and_preallocated_reads_for_cuda_graphs():
    """``state_out=state`` updates the one static buffer (what a captured graph needs); repeated steps agree with
    the out-of-place form, and the buffers' identities never change."""
    B, N, r = 2, 2, 8
    p, bias, state = make(B, N, r, seed=5)
    buf = state.clone().to(DEVICE)
    reads_buf = torch.empty(B, N * r, device=DEVICE)
    ref = state.to(DEVICE)
    for step in range(3):
        pp = (p + step).to(DEVICE)
        ref_reads, ref = delta_rule_decode_triton(pp, bias.to(DEVICE), ref, num_states=N, rank=r)
        reads, out = delta_rule_decode_triton(pp, bias.to(DEVICE), buf, num_states=N, rank=r, state_out=buf,
                                              reads_out=reads_buf)
        assert out.data_ptr() == buf.data_ptr() and reads.data_ptr() == reads_buf.data_ptr()
        torch.testing.assert_close(reads, ref_reads, atol=0, rtol=0)
        torch.testing.assert_close(buf, ref, atol=0, rtol=0)


def test_bfloat16_projections():
    p, bias, state = make(2, 1, 8, seed=6)
    pb = p.to(torch.bfloat16)
    reads, new = delta_rule_decode_triton(pb.view(2, 1, -1).to(DEVICE), bias.to(DEVICE, torch.bfloat16),
                                          state.to(DEVICE), num_states=1, rank=8)
    ref_reads, ref_state = torch_step(pb.double(), bias.to(torch.bfloat16).double(), state, None, 1, 8)
    assert new.dtype == torch.float32
    torch.testing.assert_close(reads.cpu().double(), ref_reads, **TOL)
    torch.testing.assert_close(new.cpu().double(), ref_state, **TOL)


def test_bad_inputs_are_refused():
    p, bias, state = make(2, 1, 8)
    p, bias, state = p.to(DEVICE), bias.to(DEVICE), state.to(DEVICE)
    with pytest.raises(ValueError, match="4·N·r"):
        delta_rule_decode_triton(p[:, :-1], bias, state, num_states=1, rank=8)
    with pytest.raises(ValueError, match="one position"):
        delta_rule_decode_triton(p.view(2, 2, -1), bias, state, num_states=1, rank=4)
    with pytest.raises(ValueError, match="float32"):
        delta_rule_decode_triton(p, bias, state.double(), num_states=1, rank=8)
    with pytest.raises(ValueError, match="update"):
        delta_rule_decode_triton(p, bias, state, num_states=1, rank=8, update="lambda")
    with pytest.raises(ValueError, match="no_lambda"):
        delta_rule_decode_triton(p, bias, state, num_states=1, rank=8, update="no_lambda", decay=torch.ones_like(bias))
    with pytest.raises(ValueError, match="mask"):
        delta_rule_decode_triton(p, bias, state, torch.ones(3, dtype=torch.bool, device=DEVICE), num_states=1, rank=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_cuda_graph_replays_the_step():  # pragma: no cover - GPU only
    B, N, r = 2, 1, 8
    p, bias, state = (x.cuda() for x in make(B, N, r, seed=7))
    static_p, buf, reads = p.clone(), state.clone(), torch.empty(B, N * r, device="cuda")
    delta_rule_decode_triton(static_p, bias, buf.clone(), num_states=N, rank=r)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        delta_rule_decode_triton(static_p, bias, buf, num_states=N, rank=r, state_out=buf, reads_out=reads)
    ref = state.clone()
    for step in range(3):
        static_p.copy_(p + step)
        graph.replay()
        ref_reads, ref = delta_rule_decode_triton(p + step, bias, ref, num_states=N, rank=r)
        torch.testing.assert_close(reads, ref_reads)
        torch.testing.assert_close(buf, ref)
