"""The Triton scan (forward and backward) against the per-token reference.

Runs on CUDA when there is a GPU, otherwise on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by
``triton_helpers`` when no GPU is present): the same kernel source and float32 arithmetic, slowly, so shapes are
small. Skips (with the reason) when triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import DEVICE, affine_reference

from deltamem_agents.ops import delta_rule_reference
from deltamem_agents.ops.triton_scan import default_chunk_size, delta_rule_triton, delta_rule_triton_affine
from deltamem_agents.ops.triton_support import TritonUnavailableError

# float32 kernel vs float64 reference: the kernel's rounding only (inputs are exactly representable in float32)
F32_TOL = dict(atol=2e-5, rtol=1e-4)
# bfloat16 inputs vs the float64 reference on the same (bf16-rounded) values: the kernel computes in float32, so the
# state and gradients match as for float32; only `out` is rounded to bf16 (relative 2^-8) on the way out.
BF16_OUT_TOL = dict(atol=2e-2, rtol=1e-2)


def make_inputs(B, T, N, r, seed=0, mask=False, init=True, extreme=False):
    """float64 inputs that are exactly float32 (so one reference serves both), built like the real ones."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = F.normalize(torch.tanh(randn(B, T, N, r)), dim=-1)
    k = F.normalize(torch.tanh(randn(B, T, N, r)), dim=-1)
    v = randn(B, T, N, r)
    beta = torch.sigmoid(randn(B, T, N, r) - 1.0)
    if extreme:  # gates of exactly 0 and 1 (no clamping is needed in this algorithm)
        u = torch.rand(B, T, N, r, generator=g, dtype=torch.float64)
        beta = torch.where(u < 0.2, 0.0, torch.where(u > 0.8, 1.0, beta))
    s0 = 0.5 * randn(B, N, r, r) if init else None
    m = None
    if mask:
        m = torch.rand(B, T, generator=g) > 0.3
        m[0, : max(T // 3, 1)] = False  # leading padding (left-padded prompt)
        if B > 1:
            m[1, -1] = False  # trailing padding
    xs = [x.float().double() if x is not None else None for x in (q, k, v, beta, s0)]
    return xs, m


def on_device(xs, dtype=torch.float32):
    return [x.to(DEVICE, dtype) if x is not None else None for x in xs]


FORWARD_CASES = [  # B, T, N, r, chunk, mask, init
    (1, 1, 1, 8, None, False, True),
    (2, 7, 2, 8, 3, True, True),
    (3, 7, 1, 3, None, True, False),
    (1, 65, 1, 16, 16, False, True),
    (2, 130, 2, 5, 32, True, True),
]


@pytest.mark.parametrize("B,T,N,r,chunk,use_mask,init", FORWARD_CASES)
def test_forward_matches_reference(B, T, N, r, chunk, use_mask, init):
    (q, k, v, beta, s0), mask = make_inputs(B, T, N, r, mask=use_mask, init=init)
    ref_out, ref_state = delta_rule_reference(q, k, v, beta, s0, mask)
    out, state = delta_rule_triton(*on_device([q, k, v, beta, s0]), None if mask is None else mask.to(DEVICE),
                                   chunk_size=chunk)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert out.shape == (B, T, N, r) and state.shape == (B, N, r, r)
    torch.testing.assert_close(out.cpu().double(), ref_out, **F32_TOL)
    torch.testing.assert_close(state.cpu().double(), ref_state, **F32_TOL)


def test_chunk_size_changes_only_rounding():
    (q, k, v, beta, s0), mask = make_inputs(2, 37, 1, 8, mask=True, extreme=True)
    xs = on_device([q, k, v, beta, s0])
    results = [delta_rule_triton(*xs, mask.to(DEVICE), chunk_size=c) for c in (1, 5, 16, 37, 64)]
    ref_out, ref_state = delta_rule_reference(q, k, v, beta, s0, mask)
    for out, state in results:
        torch.testing.assert_close(out.cpu().double(), ref_out, **F32_TOL)
        torch.testing.assert_close(state.cpu().double(), ref_state, **F32_TOL)


def _grads(fn, xs, mask, g_out, g_state):
    xs = [x.detach().clone().requires_grad_() if x is not None else None for x in xs]
    out, state = fn(*xs, mask)
    ((out.double() * g_out).sum() + (state.double() * g_state).sum()).backward()
    return out, state, [x.grad if x is not None else None for x in xs]


GRAD_CASES = [  # B, T, N, r, chunk, mask, init
    (1, 1, 1, 8, None, False, True),
    (2, 7, 2, 8, 3, True, True),
    (1, 7, 4, 8, 3, False, True),
    (1, 65, 1, 4, 16, True, False),
    (1, 130, 1, 5, 32, False, True),
]


@pytest.mark.parametrize("B,T,N,r,chunk,use_mask,init", GRAD_CASES)
def test_gradients_match_reference(B, T, N, r, chunk, use_mask, init):
    (q, k, v, beta, s0), mask = make_inputs(B, T, N, r, mask=use_mask, init=init, seed=1)
    g = torch.Generator().manual_seed(7)
    g_out = torch.randn(B, T, N, r, generator=g, dtype=torch.float64)
    g_state = torch.randn(B, N, r, r, generator=g, dtype=torch.float64)
    xs = [q, k, v, beta, s0]
    _, _, ref = _grads(delta_rule_reference, xs, mask, g_out, g_state)
    dev_mask = None if mask is None else mask.to(DEVICE)
    _, _, got = _grads(lambda *a: delta_rule_triton(*a, chunk_size=chunk), on_device(xs), dev_mask,
                       g_out.to(DEVICE), g_state.to(DEVICE))
    for name, a, b in zip(("q", "k", "v", "beta", "initial_state"), got, ref, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.cpu().double(), b, **F32_TOL, msg=lambda m, n=name: f"grad {n}: {m}")


def test_gradients_when_only_the_state_or_only_the_reads_are_used():
    (q, k, v, beta, s0), mask = make_inputs(1, 9, 1, 8, mask=True, seed=2)
    for use in ("out", "state"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, beta, s0)]
        out, state = delta_rule_reference(*xs, mask)
        (out.sum() if use == "out" else state.sum()).backward()
        ys = [x.detach().to(DEVICE, torch.float32).requires_grad_() for x in (q, k, v, beta, s0)]
        out_t, state_t = delta_rule_triton(*ys, mask.to(DEVICE), chunk_size=4)
        (out_t.sum() if use == "out" else state_t.sum()).backward()
        for x, y in zip(xs, ys, strict=True):  # the reference leaves an unused input's grad None: zero
            expected = x.grad if x.grad is not None else torch.zeros_like(x)
            torch.testing.assert_close(y.grad.cpu().double(), expected, **F32_TOL)


def test_decay_rule_values_and_gradients():
    (q, k, v, beta, s0), mask = make_inputs(2, 11, 2, 8, mask=True, seed=3)
    lam = torch.sigmoid(torch.randn(2, 11, 2, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
                        + 2.0).float().double()
    lam[0, 3] = 1.0  # the delta rule's λ = 1 somewhere
    g = torch.Generator().manual_seed(5)
    g_out, g_state = torch.randn(2, 11, 2, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 8, 8, generator=g,
                                                                                             dtype=torch.float64)
    xs = [q, k, v, beta, s0, lam]
    ref_out, ref_state, ref = _grads(lambda q, k, v, b, s, d, m: delta_rule_reference(q, k, v, b, s, m, decay=d),
                                     xs, mask, g_out, g_state)
    out, state, got = _grads(lambda q, k, v, b, s, d, m: delta_rule_triton(q, k, v, b, s, m, decay=d, chunk_size=4),
                             on_device(xs), mask.to(DEVICE), g_out.to(DEVICE), g_state.to(DEVICE))
    torch.testing.assert_close(out.detach().cpu().double(), ref_out.detach(), **F32_TOL)
    torch.testing.assert_close(state.detach().cpu().double(), ref_state.detach(), **F32_TOL)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, **F32_TOL)


@pytest.mark.parametrize("mode", ["lambda_outside", "no_lambda"])
def test_affine_modes_values_and_gradients(mode):
    """The authors' other ``state_update_mode`` values through the general kernel, against the plain loop."""
    (q, k, v, beta, s0), mask = make_inputs(1, 13, 2, 8, mask=True, seed=6)
    lam = (1 - beta) if mode == "lambda_outside" else torch.ones_like(beta)
    keep, erase, write = lam, lam * beta if mode == "lambda_outside" else beta, beta
    g = torch.Generator().manual_seed(8)
    g_out, g_state = torch.randn(1, 13, 2, 8, generator=g, dtype=torch.float64), torch.randn(1, 2, 8, 8, generator=g,
                                                                                             dtype=torch.float64)
    xs = [q, k, v, keep.detach(), erase.detach(), write.detach(), s0]
    ref_out, ref_state, ref = _grads(affine_reference, xs, mask, g_out, g_state)
    out, state, got = _grads(lambda *a: delta_rule_triton_affine(*a, chunk_size=5), on_device(xs), mask.to(DEVICE),
                             g_out.to(DEVICE), g_state.to(DEVICE))
    torch.testing.assert_close(out.detach().cpu().double(), ref_out.detach(), **F32_TOL)
    torch.testing.assert_close(state.detach().cpu().double(), ref_state.detach(), **F32_TOL)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, **F32_TOL)


def test_affine_standard_mode_is_the_coupled_rule():
    (q, k, v, beta, s0), mask = make_inputs(2, 9, 1, 8, mask=True, seed=9)
    xs = on_device([q, k, v, beta, s0])
    a = delta_rule_triton(*xs, mask.to(DEVICE), chunk_size=4)
    b = delta_rule_triton_affine(xs[0], xs[1], xs[2], 1 - xs[3], xs[3], xs[3], xs[4], mask.to(DEVICE), chunk_size=4)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_bfloat16_inputs_compute_in_float32():
    """bf16 q/k/v/β (as a bf16 base would produce): state and gradients as accurate as with float32 inputs
    (compared with the float64 reference on the same bf16-rounded values); ``out`` comes back in bf16."""
    (q, k, v, beta, s0), mask = make_inputs(2, 21, 1, 8, mask=True, seed=10)
    rounded = [x.to(torch.bfloat16).double() for x in (q, k, v, beta)] + [s0.float().double()]
    g = torch.Generator().manual_seed(11)
    g_out, g_state = torch.randn(2, 21, 1, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 8, 8, generator=g,
                                                                                             dtype=torch.float64)
    g_out = g_out.to(torch.bfloat16).double()  # the gradient reaching a bf16 `out` is bf16: give the reference the same
    ref_out, ref_state, ref = _grads(delta_rule_reference, rounded, mask, g_out, g_state)
    xs = [x.to(DEVICE, torch.bfloat16) for x in rounded[:4]] + [rounded[4].to(DEVICE, torch.float32)]
    out, state, got = _grads(lambda *a: delta_rule_triton(*a, chunk_size=8), xs, mask.to(DEVICE),
                             g_out.to(DEVICE), g_state.to(DEVICE))
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(out.detach().cpu().double(), ref_out.detach(), **BF16_OUT_TOL)
    torch.testing.assert_close(state.detach().cpu().double(), ref_state.detach(), **F32_TOL)
    # input gradients are rounded to bf16 on the way out (relative 2^-8)
    for name, a, b in zip(("q", "k", "v", "beta"), got[:4], ref[:4], strict=True):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-2, rtol=1e-2)
    assert got[4].dtype == torch.float32
    torch.testing.assert_close(got[4].cpu().double(), ref[4], **F32_TOL)


def test_empty_sequence_and_default_chunks():
    (q, k, v, beta, s0), _ = make_inputs(1, 0, 1, 8)
    out, state = delta_rule_triton(*on_device([q, k, v, beta, s0]))
    assert out.shape == (1, 0, 1, 8) and state.dtype == torch.float32
    torch.testing.assert_close(state.cpu().double(), s0)
    assert [default_chunk_size(t) for t in (1, 100, 4096, 32768)] == [16, 16, 64, 128]


def test_bad_inputs_are_refused_clearly():
    (q, k, v, beta, s0), _ = make_inputs(1, 4, 1, 8)
    q, k, v, beta, s0 = on_device([q, k, v, beta, s0])
    with pytest.raises(ValueError, match="shape of q"):
        delta_rule_triton(q, k[:, :3], v, beta)
    with pytest.raises(ValueError, match="float64"):
        delta_rule_triton(q.double(), k.double(), v.double(), beta.double())
    with pytest.raises(ValueError, match="dtype of q"):
        delta_rule_triton(q, k, v, beta.half())
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule_triton(q, k, v, beta, s0[:, :, :4])
    with pytest.raises(ValueError, match="mask"):
        delta_rule_triton(q, k, v, beta, mask=torch.ones(1, 4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_triton(q, k, v, beta, chunk_size=0)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU refusal without the interpreter")
def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    (q, k, v, beta, _), _ = make_inputs(1, 2, 1, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET"):
        delta_rule_triton(*on_device([q, k, v, beta]))


@pytest.mark.slow
@pytest.mark.parametrize("B,T,N,r,chunk", [(1, 257, 1, 16, 32)])
def test_larger_shapes_values_and_gradients(B, T, N, r, chunk):
    (q, k, v, beta, s0), mask = make_inputs(B, T, N, r, mask=True, seed=12, extreme=True)
    g = torch.Generator().manual_seed(13)
    g_out, g_state = torch.randn(B, T, N, r, generator=g, dtype=torch.float64), torch.randn(B, N, r, r, generator=g,
                                                                                            dtype=torch.float64)
    xs = [q, k, v, beta, s0]
    ref_out, ref_state, ref = _grads(delta_rule_reference, xs, mask, g_out, g_state)
    out, state, got = _grads(lambda *a: delta_rule_triton(*a, chunk_size=chunk), on_device(xs), mask.to(DEVICE),
                             g_out.to(DEVICE), g_state.to(DEVICE))
    torch.testing.assert_close(out.detach().cpu().double(), ref_out.detach(), **F32_TOL)
    torch.testing.assert_close(state.detach().cpu().double(), ref_state.detach(), **F32_TOL)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-4, rtol=1e-4)
