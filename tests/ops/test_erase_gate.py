"""The erase gate ``ε`` (the authors' ``state_update_mode="lambda_outside"``: ``ε = λ ⊙ β``): the chunked and step
forms agree with the reference loop on outputs, final state and gradients; ``ε = β`` is exactly the paper's rule.
(The layer's compiled CPU kernel in every rule: ``tests/adapter/test_cpu_kernel.py``.)"""

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


def _gates(rule, beta, decay):
    """(decay, erase) of each rule: the authors' lambda_outside with a coupled, a separate and a unit λ."""
    if rule == "lambda_outside":
        return None, (1 - beta) * beta
    if rule == "lambda_outside_decoupled":
        return decay, decay * beta
    return torch.ones_like(beta), beta  # λ = 1: lambda_outside is the pure delta rule


RULES = ("lambda_outside", "lambda_outside_decoupled", "lambda_outside_delta")


@pytest.mark.parametrize(("B", "T", "N", "r", "chunk"), [(1, 1, 1, 8, 4), (2, 13, 1, 8, 4), (3, 37, 2, 4, 16),
                                                           (1, 64, 1, 16, 64), (2, 9, 4, 3, 5), (1, 257, 4, 8, 64)])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_matches_reference_with_erase(B, T, N, r, chunk, rule, with_init):
    q, k, v, beta, decay, s0, mask = _inputs(B, T, N, r, seed=T * 7 + r)
    decay, erase = _gates(rule, beta, decay)
    init = s0 if with_init else None
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, init, mask, decay=decay, erase=erase)
    out, s = delta_rule_chunked(q, k, v, beta, init, mask, chunk_size=chunk, decay=decay, erase=erase)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, ref_s, rtol=1e-9, atol=1e-9)


def test_lambda_outside_differs_from_the_papers_rule():
    """Not a no-op: with the same gates, the erase scaled by λ leaves another state."""
    q, k, v, beta, _, s0, mask = _inputs(2, 11, 1, 8, seed=4)
    paper = delta_rule_reference(q, k, v, beta, s0, mask)[1]
    outside = delta_rule_reference(q, k, v, beta, s0, mask, erase=(1 - beta) * beta)[1]
    assert (paper - outside).abs().max() > 1e-2


def test_erase_equal_to_beta_is_the_papers_rule():
    q, k, v, beta, _, s0, mask = _inputs(2, 11, 1, 8, seed=3)
    paper = delta_rule_reference(q, k, v, beta, s0, mask)
    for fn, kw, tol in ((delta_rule_reference, {}, 1e-15), (delta_rule_chunked, {"chunk_size": 4}, 1e-9)):
        got = fn(q, k, v, beta, s0, mask, erase=beta.clone(), **kw)
        for a, b in zip(paper, got, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("N", "r"), [(1, 8), (4, 8), (2, 16)])
def test_step_matches_reference_with_erase(rule, masked, N, r):
    q, k, v, beta, decay, s0, _ = _inputs(3, 1, N, r, seed=5 + N + r)
    decay, erase = _gates(rule, beta, decay)
    m = torch.tensor([[True], [False], [True]]) if masked else None
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, s0, m, decay=decay, erase=erase)
    out, s = delta_rule_step(q, k, v, beta, s0, m, decay=decay, erase=erase)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)
    if masked:
        torch.testing.assert_close(s[1], s0[1], rtol=0, atol=0)


@pytest.mark.parametrize("rule", RULES)
def test_gradients_match_reference_with_erase(rule):
    B, T, N, r = 2, 19, 2, 4
    q, k, v, beta, decay, s0, mask = _inputs(B, T, N, r, seed=11)
    w = torch.randn(B, T, N, r, dtype=torch.float64)

    def grads(fn, **kw):
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, beta, decay, s0)]
        d, e = _gates(rule, xs[3], xs[4])  # the gates are functions of β (and λ): gradients flow through them
        out, s = fn(xs[0], xs[1], xs[2], xs[3], xs[5], mask, decay=d, erase=e, **kw)
        ((out * w).sum() + s.square().sum()).backward()
        return [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]

    for a, b in zip(grads(delta_rule_reference), grads(delta_rule_chunked, chunk_size=8), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    q1 = [x[:, :1] for x in (q, k, v, beta, decay)]
    step_grads = []
    for fn in (delta_rule_reference, delta_rule_step):
        xs = [x.detach().clone().requires_grad_(True) for x in (*q1, s0)]
        d, e = _gates(rule, xs[3], xs[4])
        out, s = fn(xs[0], xs[1], xs[2], xs[3], xs[5], mask[:, :1], decay=d, erase=e)
        ((out * w[:, :1]).sum() + s.square().sum()).backward()
        step_grads.append([torch.zeros_like(x) if x.grad is None else x.grad for x in xs])
    for a, b in zip(*step_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_chunked_with_erase():
    q, k, v, beta, decay, s0, mask = _inputs(1, 6, 1, 3, seed=2)
    xs = [x.clone().requires_grad_(True) for x in (q, k, v, beta, decay, s0)]

    def fn(q, k, v, beta, decay, s0):
        out, s = delta_rule_chunked(q, k, v, beta, s0, mask, chunk_size=4, decay=decay, erase=decay * beta)
        return out, s

    assert torch.autograd.gradcheck(fn, xs)


def test_erase_shape_and_dtype_are_checked():
    q, k, v, beta, decay, s0, mask = _inputs(1, 5, 1, 8, seed=1)
    with pytest.raises(ValueError, match="erase"):
        delta_rule_reference(q, k, v, beta, s0, mask, erase=beta[:, :4])
    with pytest.raises(ValueError, match="erase"):
        delta_rule_chunked(q, k, v, beta, s0, mask, erase=beta.float())
    with pytest.raises(ValueError, match="erase"):
        delta_rule_step(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], s0, None, erase=beta[:, :1, :, :4])
