"""The decoupled and pure delta rules (a separate retention ``decay``; beyond the paper): the chunked and step
forms agree with the reference loop on outputs, final state and gradients, and ``decay = 1 − beta`` is exactly
the paper's coupled rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltamem_agents.ops import delta_rule_chunked, delta_rule_reference, delta_rule_step


def _inputs(B, T, N, r, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, N, r, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, N, r, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, N, r, generator=g, dtype=dtype)
    beta = torch.rand(B, T, N, r, generator=g, dtype=dtype)
    decay = torch.rand(B, T, N, r, generator=g, dtype=dtype) * 0.5 + 0.5
    s0 = torch.randn(B, N, r, r, generator=g, dtype=dtype) * 0.3
    mask = torch.rand(B, T, generator=g) > 0.2
    return q, k, v, beta, decay, s0, mask


@pytest.mark.parametrize(("B", "T", "N", "r", "chunk"), [(1, 1, 1, 8, 4), (2, 13, 1, 8, 4), (3, 37, 2, 4, 16),
                                                           (1, 64, 1, 16, 64), (2, 9, 4, 3, 5)])
@pytest.mark.parametrize("rule", ["decoupled", "delta"])
def test_chunked_matches_reference_with_decay(B, T, N, r, chunk, rule):
    q, k, v, beta, decay, s0, mask = _inputs(B, T, N, r, seed=T * 7 + r)
    if rule == "delta":
        decay = torch.ones_like(decay)
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, s0, mask, decay=decay)
    out, s = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=chunk, decay=decay)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, ref_s, rtol=1e-9, atol=1e-9)


def test_decay_one_minus_beta_is_the_coupled_rule():
    q, k, v, beta, _, s0, mask = _inputs(2, 11, 1, 8, seed=3)
    coupled = delta_rule_reference(q, k, v, beta, s0, mask)
    explicit = delta_rule_reference(q, k, v, beta, s0, mask, decay=1 - beta)
    for a, b in zip(coupled, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    chunked = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=4, decay=1 - beta)
    for a, b in zip(coupled, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("masked", [False, True])
def test_step_matches_reference_with_decay(masked):
    q, k, v, beta, decay, s0, mask = _inputs(3, 1, 2, 8, seed=5)
    m = mask if masked else None
    if masked:
        m = torch.tensor([[True], [False], [True]])
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, s0, m, decay=decay)
    out, s = delta_rule_step(q, k, v, beta, s0, m, decay=decay)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)


def test_pure_delta_rule_keeps_an_orthogonal_write_forever():
    """λ = 1: a value written under key e_0 is read back exactly after any number of writes to other keys."""
    r, T = 8, 30
    k = torch.zeros(1, T, 1, r, dtype=torch.float64)
    k[0, 0, 0, 0] = 1.0
    k[0, 1:, 0, 1:] = F.normalize(torch.randn(T - 1, r - 1, dtype=torch.float64), dim=-1)
    v = torch.randn(1, T, 1, r, dtype=torch.float64)
    beta = torch.ones(1, T, 1, r, dtype=torch.float64)
    _, s = delta_rule_chunked(k, k, v, beta, None, None, chunk_size=8, decay=torch.ones_like(beta))
    torch.testing.assert_close(s[0, 0] @ k[0, 0, 0], v[0, 0, 0], rtol=1e-10, atol=1e-10)


def test_gradients_match_reference_with_decay():
    q, k, v, beta, decay, s0, mask = _inputs(2, 19, 1, 8, seed=11)
    tensors = [x.clone().requires_grad_(True) for x in (q, k, v, beta, decay, s0)]
    w = torch.randn(2, 19, 1, 8, dtype=torch.float64)

    def grads(fn, **kw):
        xs = [x.detach().clone().requires_grad_(True) for x in tensors]
        out, s = fn(xs[0], xs[1], xs[2], xs[3], xs[5], mask, decay=xs[4], **kw)
        ((out * w).sum() + s.square().sum()).backward()
        return [x.grad for x in xs]

    for a, b in zip(grads(delta_rule_reference), grads(delta_rule_chunked, chunk_size=8), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_decay_shape_is_checked():
    q, k, v, beta, decay, s0, mask = _inputs(1, 5, 1, 8, seed=1)
    with pytest.raises(ValueError, match="decay"):
        delta_rule_reference(q, k, v, beta, s0, mask, decay=decay[:, :4])
    with pytest.raises(ValueError, match="decay"):
        delta_rule_chunked(q, k, v, beta, s0, mask, decay=decay.float())


@pytest.mark.parametrize(("B", "T", "N", "r", "dv", "chunk"), [(1, 1, 1, 8, 24, 4), (2, 17, 1, 8, 40, 8),
                                                               (3, 33, 2, 4, 9, 16), (1, 5, 1, 16, 16, 2)])
@pytest.mark.parametrize("with_decay", [False, True])
def test_value_width_other_than_key_width(B, T, N, r, dv, chunk, with_decay):
    """Wide values: ``v``/``beta``/``decay`` of width ``dv``, state ``(B, N, dv, r)``; all three forms agree."""
    q, k, _, _, _, _, mask = _inputs(B, T, N, r, seed=dv + T)
    g = torch.Generator().manual_seed(dv)
    v = torch.randn(B, T, N, dv, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, N, 1, generator=g, dtype=torch.float64).expand(B, T, N, dv)
    decay = (torch.rand(B, T, N, dv, generator=g, dtype=torch.float64) * 0.5 + 0.5) if with_decay else None
    s0 = torch.randn(B, N, dv, r, generator=g, dtype=torch.float64) * 0.3
    ref = delta_rule_reference(q, k, v, beta, s0, mask, decay=decay)
    out = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=chunk, decay=decay)
    assert ref[0].shape == (B, T, N, dv) and ref[1].shape == (B, N, dv, r)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    step = delta_rule_step(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], s0, mask[:, :1],
                           decay=None if decay is None else decay[:, :1])
    ref1 = delta_rule_reference(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], s0, mask[:, :1],
                                decay=None if decay is None else decay[:, :1])
    for a, b in zip(step, ref1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_wide_state_shape_is_checked():
    q, k, _, _, _, _, _ = _inputs(1, 3, 1, 8, seed=2)
    v = torch.randn(1, 3, 1, 20, dtype=torch.float64)
    beta = torch.rand(1, 3, 1, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule_chunked(q, k, v, beta, torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta"):
        delta_rule_reference(q, k, v, beta[..., :8])


@pytest.mark.parametrize(("B", "T", "N", "r", "dv", "chunk"), [(1, 1, 1, 8, 24, 4), (2, 17, 1, 8, 40, 8),
                                                               (3, 33, 2, 4, 9, 16), (2, 64, 1, 16, 30, 64),
                                                               (1, 23, 1, 8, 8, 5)])
@pytest.mark.parametrize("rule", ["coupled", "decoupled", "delta"])
def test_shared_gate_form_matches_reference(B, T, N, r, dv, chunk, rule):
    from deltamem_agents.ops.shared_gate import delta_rule_chunked_shared_gate

    q, k, _, _, _, _, mask = _inputs(B, T, N, r, seed=dv * 3 + T)
    g = torch.Generator().manual_seed(dv + 1)
    v = torch.randn(B, T, N, dv, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, N, generator=g, dtype=torch.float64)
    decay = {"coupled": None, "delta": torch.ones(B, T, N, dtype=torch.float64),
             "decoupled": torch.rand(B, T, N, generator=g, dtype=torch.float64) * 0.5 + 0.5}[rule]
    s0 = torch.randn(B, N, dv, r, generator=g, dtype=torch.float64) * 0.3
    def expand(x):
        return (None if x is None else x[..., None].expand(B, T, N, dv))
    ref = delta_rule_reference(q, k, v, expand(beta), s0, mask, decay=expand(decay))
    got = delta_rule_chunked_shared_gate(q, k, v, beta, s0, mask, chunk_size=chunk, decay=decay)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_shared_gate_gradients_match_reference():
    from deltamem_agents.ops.shared_gate import delta_rule_chunked_shared_gate

    B, T, N, r, dv = 2, 13, 1, 4, 6
    q, k, _, _, _, _, mask = _inputs(B, T, N, r, seed=4)
    g = torch.Generator().manual_seed(9)
    v = torch.randn(B, T, N, dv, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, N, generator=g, dtype=torch.float64)
    decay = torch.rand(B, T, N, generator=g, dtype=torch.float64) * 0.5 + 0.5
    s0 = torch.randn(B, N, dv, r, generator=g, dtype=torch.float64)
    w = torch.randn(B, T, N, dv, generator=g, dtype=torch.float64)

    def grads(shared):
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, beta, decay, s0)]
        if shared:
            out, s = delta_rule_chunked_shared_gate(xs[0], xs[1], xs[2], xs[3], xs[5], mask, chunk_size=4, decay=xs[4])
        else:
            def e(x):
                return (x[..., None].expand(B, T, N, dv))
            out, s = delta_rule_reference(xs[0], xs[1], xs[2], e(xs[3]), xs[5], mask, decay=e(xs[4]))
        ((out * w).sum() + s.square().sum()).backward()
        return [x.grad for x in xs]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
