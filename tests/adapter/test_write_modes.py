"""The defining behaviour of the three write modes, checked on one `DeltaMemLayer` against plain loops."""

from __future__ import annotations

import pytest
import torch

from deltamem_agents.adapter import DeltaMemConfig, DeltaMemLayer
from deltamem_agents.adapter.segments import plan_segments
from deltamem_agents.ops.reference import delta_rule_reference

D, Q_OUT, O_OUT = 32, 48, 32


def make_layer(mode: str, seed: int = 0, **kw) -> DeltaMemLayer:
    cfg = DeltaMemConfig(write_mode=mode, chunk_size=4, **kw)
    layer = DeltaMemLayer(D, Q_OUT, O_OUT, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def test_tsw_writes_every_unmasked_token():
    layer = make_layer("tsw")
    x = torch.randn(2, 13, D)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False  # left padding in row 1
    s0 = torch.randn(2, 1, 8, 8) * 0.1
    reads, s = layer.token_write(x, s0, mask)
    q, k, v, beta = layer.split(layer.project(x))
    ref_out, ref_s = delta_rule_reference(q, k, v, beta, s0, mask)
    torch.testing.assert_close(reads, ref_out.reshape(2, 13, 8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-5)
    # row 1 without its padding gives the same state: padding writes nothing
    _, s_alone = layer.token_write(x[1:, 4:], s0[1:], None)
    torch.testing.assert_close(s[1:], s_alone, atol=1e-5, rtol=1e-5)
    # and a decode step (T = 1) continues exactly like the scan
    r1, s1 = layer.token_write(x[:, :1], s0, None)
    torch.testing.assert_close(r1, ref_out[:, :1].reshape(2, 1, 8), atol=1e-6, rtol=1e-6)


def test_msw_keeps_independent_sub_states_with_concatenated_reads():
    msw = make_layer("msw")
    assert msw.num_states == 4
    x = torch.randn(2, 11, D)
    s0 = torch.randn(2, 4, 8, 8) * 0.1
    reads, s = msw.token_write(x, s0, None)
    assert reads.shape == (2, 11, 32) and s.shape == (2, 4, 8, 8)
    blocks = msw.in_proj.detach().split(32, dim=0)  # [q; k; v; β], each (N·r, d)
    for n in range(4):
        tsw = make_layer("tsw")
        with torch.no_grad():
            tsw.in_proj.copy_(torch.cat([b[8 * n : 8 * (n + 1)] for b in blocks]))
            tsw.beta_bias.copy_(msw.beta_bias[8 * n : 8 * (n + 1)])
        r_n, s_n = tsw.token_write(x, s0[:, n : n + 1], None)
        torch.testing.assert_close(reads[..., 8 * n : 8 * (n + 1)], r_n, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[:, n : n + 1], s_n, atol=1e-5, rtol=1e-5)


def ssw_reference(layer, x, seg, s0):
    """Plain loop over messages: tokens read S, then the message's mean projection is written once.

    The last message is left open (not written); returns reads, state, and the open message's projection sum.
    """
    p = layer.project(x)
    B, T, _ = p.shape
    reads = torch.zeros(B, T, layer.num_states * layer.rank)
    states, pend = [], []
    for b in range(B):
        s = s0[b : b + 1].clone()
        ids = seg[b].tolist()
        bounds = [0] + [t for t in range(1, T) if ids[t] != ids[t - 1]] + [T]
        for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            q = layer.query(p[b : b + 1, a:e])
            reads[b, a:e] = torch.einsum("bnij,btnj->btni", s, q).reshape(e - a, -1)
            if i < len(bounds) - 2:
                _, k, v, beta = layer.split(p[b : b + 1, a:e].mean(1, keepdim=True))
                _, s = delta_rule_reference(torch.zeros_like(k), k, v, beta, s, None)
            else:
                pend.append(p[b, a:e].sum(0))
        states.append(s)
    return reads, torch.cat(states), torch.stack(pend)


def run_ssw(layer, x, seg, s0, pending=None, count=None, last=None, mask=None):
    B = x.shape[0]
    W = 4 * layer.num_states * layer.rank
    pending = torch.zeros(B, W) if pending is None else pending
    count = torch.zeros(B) if count is None else count
    last = torch.full((B,), -1) if last is None else last
    m = torch.ones(seg.shape, dtype=torch.bool) if mask is None else mask
    plan = plan_segments(seg, m, last, count)
    reads, s, pend = layer.sequence_write(x, s0, pending, plan)
    new_count = plan.counts.gather(1, plan.last_slot[:, None])[:, 0]
    return reads, s, pend, new_count, plan.last_segment


@pytest.mark.parametrize("lengths", [(5, 9, 1, 6), (1, 1, 1), (13,), (2, 11, 3)])
def test_ssw_writes_each_message_once_as_its_mean_and_reads_the_state_before_it(lengths):
    layer = make_layer("ssw")
    T = sum(lengths)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].repeat(2, 1)
    x = torch.randn(2, T, D)
    s0 = torch.randn(2, 1, 8, 8) * 0.1
    reads, s, pend, count, last = run_ssw(layer, x, seg, s0)
    ref_reads, ref_s, ref_pend = ssw_reference(layer, x, seg, s0)
    torch.testing.assert_close(reads, ref_reads, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pend, ref_pend, atol=1e-5, rtol=1e-5)
    assert count.tolist() == [lengths[-1]] * 2 and last.tolist() == [len(lengths) - 1] * 2


def test_ssw_message_split_across_calls_is_still_written_once():
    layer = make_layer("ssw")
    seg = torch.tensor([[0] * 4 + [1] * 7 + [2] * 5 + [3]])
    x = torch.randn(1, 17, D)
    s0 = torch.zeros(1, 1, 8, 8)
    full_reads, full_s, full_pend, _, _ = run_ssw(layer, x, seg, s0)
    r1, s1, p1, c1, l1 = run_ssw(layer, x[:, :7], seg[:, :7], s0)  # cuts message 1
    r2, s2, p2, c2, l2 = run_ssw(layer, x[:, 7:13], seg[:, 7:13], s1, p1, c1, l1)  # cuts message 2
    r3, s3, p3, _, _ = run_ssw(layer, x[:, 13:], seg[:, 13:], s2, p2, c2, l2)
    torch.testing.assert_close(torch.cat([r1, r2, r3], 1), full_reads, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s3, full_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p3, full_pend, atol=1e-5, rtol=1e-5)


def test_ssw_with_one_token_messages_equals_tsw():
    ssw = make_layer("ssw", seed=3)
    tsw = make_layer("tsw", seed=3)
    x = torch.randn(2, 9, D)
    s0 = torch.randn(2, 1, 8, 8) * 0.1
    seg = torch.arange(9)[None].repeat(2, 1)
    # closing the last message needs one more token: append a token of a new message
    x2 = torch.cat([x, torch.randn(2, 1, D)], 1)
    seg2 = torch.cat([seg, torch.full((2, 1), 9)], 1)
    reads, s, *_ = run_ssw(ssw, x2, seg2, s0)
    t_reads, t_s = tsw.token_write(x2, s0, torch.tensor([[True] * 9 + [False]] * 2))
    torch.testing.assert_close(reads, t_reads, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, t_s, atol=1e-5, rtol=1e-5)


def test_ssw_padding_is_ignored_and_bad_ids_are_refused():
    layer = make_layer("ssw")
    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    x = torch.randn(1, 6, D)
    s0 = torch.randn(1, 1, 8, 8) * 0.1
    padded_x = torch.cat([torch.randn(1, 3, D), x], 1)
    padded_seg = torch.cat([torch.zeros(1, 3, dtype=torch.long), seg], 1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    r_pad, s_pad, p_pad, *_ = run_ssw(layer, padded_x, padded_seg, s0, mask=mask)
    r, s, p, *_ = run_ssw(layer, x, seg, s0)
    torch.testing.assert_close(r_pad[:, 3:], r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_pad, s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_pad, p, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-decreasing"):
        run_ssw(layer, x, torch.tensor([[0, 1, 0, 1, 2, 2]]), s0)
