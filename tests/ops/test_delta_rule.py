"""The chunked and single-step gated delta rule against the per-token reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltamem_agents.ops import delta_rule_chunked, delta_rule_reference, delta_rule_step

F32_TOL = 1e-5
F64_TOL = 1e-11


def make_inputs(B, T, N, r, dtype=torch.float64, seed=0, extreme=False):
    """Inputs built like the real ones: normalised tanh q/k, gaussian v, beta = sigmoid(x − 1.5)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = F.normalize(torch.tanh(randn(B, T, N, r)), dim=-1)
    k = F.normalize(torch.tanh(randn(B, T, N, r)), dim=-1)
    v = randn(B, T, N, r)
    beta = torch.sigmoid(randn(B, T, N, r) - 1.5)
    if extreme:  # some gates exactly 0 and exactly 1
        u = torch.rand(B, T, N, r, generator=g, dtype=torch.float64)
        beta = torch.where(u < 0.2, 0.0, torch.where(u > 0.8, 1.0, beta))
    s0 = randn(B, N, r, r)
    return [x.to(dtype) for x in (q, k, v, beta, s0)]


def make_mask(kind, B, T, seed=0):
    if kind is None:
        return None
    if kind == "left":  # left padding: row b starts with b * T // (2 B) pads (row 0 unpadded)
        starts = torch.tensor([b * T // (2 * B) for b in range(B)])
        return torch.arange(T)[None, :] >= starts[:, None]
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(B, T, generator=g) > 0.3


def run_steps(q, k, v, beta, s0, mask):
    """The step function applied token by token."""
    outs, s = [], s0
    for t in range(q.shape[1]):
        m = None if mask is None else mask[:, t : t + 1]
        o, s = delta_rule_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], beta[:, t : t + 1], s, m)
        outs.append(o)
    return torch.cat(outs, dim=1), s


def assert_close(actual, expected, tol):
    """Max abs error within ``tol`` relative to the magnitude of ``expected``."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = 1.0 + expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("mask_kind", [None, "left", "random"])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("r", [8, 16])
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("T", [1, 7, 63, 100, 257])
def test_forward_matches_reference_f64(T, N, r, with_init, mask_kind):
    q, k, v, beta, s0 = make_inputs(2, T, N, r, seed=T + N + r)
    s0 = s0 if with_init else None
    mask = make_mask(mask_kind, 2, T)
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, s0, mask)
    for chunk_size in (6, 64):  # 6 divides none of the T; 64 divides none of them either
        out, s = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=chunk_size)
        assert_close(out, ref_out, F64_TOL)
        assert_close(s, ref_s, F64_TOL)
    out, s = run_steps(q, k, v, beta, s0, mask)
    assert_close(out, ref_out, F64_TOL)
    assert_close(s, ref_s, F64_TOL)


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "left", "random"])
@pytest.mark.parametrize(
    "T,N,r,chunk_size", [(7, 4, 8, 4), (100, 1, 16, 64), (257, 4, 16, 32), (63, 1, 8, 63)]
)
def test_forward_matches_reference_f32(T, N, r, chunk_size, mask_kind, extreme):
    q, k, v, beta, s0 = make_inputs(2, T, N, r, dtype=torch.float32, seed=T, extreme=extreme)
    mask = make_mask(mask_kind, 2, T)
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, s0, mask)
    out, s = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=chunk_size)
    assert_close(out, ref_out, F32_TOL)
    assert_close(s, ref_s, F32_TOL)
    out, s = run_steps(q, k, v, beta, s0, mask)
    assert_close(out, ref_out, F32_TOL)
    assert_close(s, ref_s, F32_TOL)


@pytest.mark.parametrize("T", [7, 100])
def test_exact_zero_and_one_gates_f64(T):
    q, k, v, beta, s0 = make_inputs(2, T, 4, 8, seed=3, extreme=True)
    assert (beta == 0).any() and (beta == 1).any()
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, s0)
    for chunk_size in (5, 64):
        out, s = delta_rule_chunked(q, k, v, beta, s0, chunk_size=chunk_size)
        assert_close(out, ref_out, F64_TOL)
        assert_close(s, ref_s, F64_TOL)
    out, s = run_steps(q, k, v, beta, s0, None)
    assert_close(out, ref_out, F64_TOL)
    assert_close(s, ref_s, F64_TOL)


def test_output_dtype_and_default_state():
    q, k, v, beta, _ = make_inputs(1, 9, 2, 8, dtype=torch.float32)
    ref_out, ref_s = delta_rule_reference(q, k, v, beta)
    zeros = torch.zeros(1, 2, 8, 8)
    for fn in (delta_rule_reference, delta_rule_chunked):
        out, s = fn(q, k, v, beta)
        assert out.dtype == s.dtype == torch.float32
        assert out.shape == (1, 9, 2, 8) and s.shape == (1, 2, 8, 8)
        out2, s2 = fn(q, k, v, beta, zeros)
        assert_close(out2, out, F32_TOL)
        assert_close(s2, s, F32_TOL)
    out, s = delta_rule_step(q[:, :1], k[:, :1], v[:, :1], beta[:, :1])
    assert out.shape == (1, 1, 2, 8) and s.shape == (1, 2, 8, 8)
    assert_close(out, ref_out[:, :1], F32_TOL)


def test_empty_sequence():
    q, k, v, beta, s0 = make_inputs(2, 0, 1, 8)
    for fn in (delta_rule_reference, delta_rule_chunked):
        out, s = fn(q, k, v, beta, s0)
        assert out.shape == (2, 0, 1, 8)
        assert torch.equal(s, s0)


# ---------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_sequence_returns_initial_state_exactly(dtype):
    q, k, v, beta, s0 = make_inputs(2, 37, 4, 8, dtype=dtype)
    mask = torch.zeros(2, 37, dtype=torch.bool)
    for fn in (delta_rule_reference, run_steps):
        assert torch.equal(fn(q, k, v, beta, s0, mask)[1], s0)
    for chunk_size in (8, 64):
        out, s = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=chunk_size)
        assert torch.equal(s, s0)
        # every read sees the untouched initial state
        assert_close(
            out, torch.einsum("bnij,btnj->btni", s0, q), F64_TOL if dtype == torch.float64 else F32_TOL
        )


def test_masked_positions_write_nothing():
    """Running with a padding mask == running on the sequence with the padded positions removed."""
    B, T, N, r = 3, 50, 2, 8
    q, k, v, beta, s0 = make_inputs(B, T, N, r, seed=5)
    mask = make_mask("random", B, T, seed=5)
    out, s = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=16)
    for b in range(B):
        keep = mask[b]
        sub = [x[b : b + 1, keep] for x in (q, k, v, beta)]
        ref_out, ref_s = delta_rule_reference(*sub, s0[b : b + 1])
        assert_close(out[b : b + 1, keep], ref_out, F64_TOL)
        assert_close(s[b : b + 1], ref_s, F64_TOL)


# -------------------------------------------------------------------------------------------- gradients


def _grads(fn, inputs, cot_out, cot_s, mask, **kw):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, s = fn(*inputs, mask=mask, **kw)
    loss = (out * cot_out).sum() + (s * cot_s).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, 2e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("mask_kind", [None, "left", "random"])
@pytest.mark.parametrize("T,N,r,chunk_size", [(7, 4, 8, 3), (63, 1, 16, 16), (100, 4, 8, 64)])
def test_gradients_match_reference(T, N, r, chunk_size, mask_kind, dtype, tol):
    inputs = make_inputs(2, T, N, r, dtype=dtype, seed=T + 11)
    mask = make_mask(mask_kind, 2, T, seed=T)
    g = torch.Generator().manual_seed(7)
    cot_out = torch.randn(2, T, N, r, generator=g, dtype=torch.float64).to(dtype)
    cot_s = torch.randn(2, N, r, r, generator=g, dtype=torch.float64).to(dtype)
    ref = _grads(delta_rule_reference, inputs, cot_out, cot_s, mask)
    got = _grads(delta_rule_chunked, inputs, cot_out, cot_s, mask, chunk_size=chunk_size)
    for name, a, e in zip(("q", "k", "v", "beta", "initial_state"), got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, tol)


def test_gradients_with_exact_zero_and_one_gates():
    """Finite everywhere; equal to the reference except d/dβ at β == 1 exactly (documented in chunked.py)."""
    inputs = make_inputs(2, 40, 2, 8, seed=13, extreme=True)
    beta = inputs[3]
    g = torch.Generator().manual_seed(8)
    cot_out = torch.randn(2, 40, 2, 8, generator=g, dtype=torch.float64)
    cot_s = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    ref = _grads(delta_rule_reference, inputs, cot_out, cot_s, None)
    got = _grads(delta_rule_chunked, inputs, cot_out, cot_s, None, chunk_size=16)
    for i, (a, e) in enumerate(zip(got, ref, strict=True)):
        assert torch.isfinite(a).all()
        if i == 3:
            a, e = a[beta != 1], e[beta != 1]
        assert_close(a, e, 1e-10)


def test_gradcheck_chunked():
    q, k, v, beta, s0 = make_inputs(1, 5, 2, 3, seed=21)
    mask = torch.tensor([[True, False, True, True, True]])
    inputs = tuple(x.requires_grad_(True) for x in (q, k, v, beta, s0))

    def fn(q, k, v, beta, s0):
        return delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=2)

    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------- validation


def _bad_calls(T):
    q, k, v, beta, s0 = make_inputs(2, T, 2, 8)
    good = dict(q=q, k=k, v=v, beta=beta, initial_state=s0, mask=torch.ones(2, T, dtype=torch.bool))
    yield {**good, "q": q[0]}  # not 4-d
    yield {**good, "k": k[:, :, :1]}
    yield {**good, "v": v[..., :4]}
    yield {**good, "beta": beta[:1]}
    yield {**good, "v": v.float()}  # dtype mismatch
    yield {**good, "q": q.long(), "k": k.long(), "v": v.long(), "beta": beta.long()}  # not floating point
    yield {**good, "initial_state": s0[:, :1]}
    yield {**good, "initial_state": s0[..., :4]}
    yield {**good, "initial_state": s0.float()}
    yield {**good, "mask": good["mask"][:, :0]}
    yield {**good, "mask": good["mask"][None]}
    yield {**good, "mask": good["mask"].float()}


@pytest.mark.parametrize("fn", [delta_rule_reference, delta_rule_chunked, delta_rule_step])
def test_shape_validation(fn):
    for kwargs in _bad_calls(1 if fn is delta_rule_step else 4):
        with pytest.raises(ValueError):
            fn(**kwargs)


def test_step_rejects_more_than_one_position():
    q, k, v, beta, s0 = make_inputs(2, 2, 1, 8)
    with pytest.raises(ValueError, match="T == 1"):
        delta_rule_step(q, k, v, beta, s0)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.0])
def test_chunk_size_validation(chunk_size):
    q, k, v, beta, s0 = make_inputs(1, 4, 1, 8)
    with pytest.raises(ValueError):
        delta_rule_chunked(q, k, v, beta, s0, chunk_size=chunk_size)
