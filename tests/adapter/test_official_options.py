"""The authors' options at model level (``state_update_mode="lambda_outside"``, ``normalize_qk=False``,
``ssw_semantics="official"``) and the state dtype: invariants, fast path = torch path, prefill + decode = full
pass, and the semantics of their SSW (reads from the start of the call, one write per message and call, −1 never
written, no ids → token writes)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ids, randomize, tiny_model

from deltamem_agents import DeltaMemConfig, DeltaMemState, attach
from deltamem_agents.adapter import _cpu_kernel
from deltamem_agents.adapter.kernel_choice import KernelUnavailableError
from deltamem_agents.adapter.segments import plan_message_writes
from deltamem_agents.models.kv_cache import forward_with_cache, new_cache

OPTIONS = [
    {"state_update_mode": "lambda_outside"},
    {"state_update_mode": "lambda_outside", "update_rule": "decoupled"},
    {"state_update_mode": "lambda_outside", "update_rule": "delta"},
    {"normalize_qk": False},
    {"normalize_qk": False, "update_rule": "delta"},
]
MODES = ("tsw", "msw", "ssw")


def _cases():
    for opts in OPTIONS:
        for mode in MODES:
            if mode == "ssw" and opts.get("update_rule") == "decoupled":
                continue  # refused with our SSW (tested in test_config_validation)
            yield opts, mode


def _attach(model, mode, **opts):
    dm = attach(model, DeltaMemConfig(write_mode=mode, chunk_size=8, **opts))
    randomize(dm)
    if not dm.config.normalize_qk:  # raw keys: keep β‖k‖² well below 2, where the delta rule is stable
        width = dm.config.state_width
        with torch.no_grad():
            for layer in dm.delta_layers.values():
                layer.in_proj[: 2 * width].mul_(0.1)
    return dm


@pytest.mark.parametrize(("opts", "mode"), list(_cases()), ids=lambda x: str(x))
def test_zero_state_is_the_base_and_prefill_then_decode_equals_full_pass(opts, mode):
    model = tiny_model("qwen3", layers=3)
    x = ids(2, 37)
    with torch.no_grad():
        base = model(x).logits
    dm = _attach(model, mode, **opts)
    seg = torch.tensor([0] * 6 + [1] * 11 + [2] * 9 + list(range(3, 14)))[None].repeat(2, 1) if mode == "ssw" else None
    with torch.no_grad():
        dm.reset_state(2)
        with dm.writes_disabled():
            assert torch.equal(dm(x).logits, base)
        dm.reset_state(2)
        full = dm(x, segment_ids=seg).logits
        assert not torch.allclose(full, base, atol=1e-3)
        full_state = dm.get_state()
        dm.reset_state(2)
        cache, parts, pos = new_cache(model.config), [], 0
        for end in (9, 26, *range(27, 38)):
            sl = slice(pos, end)
            parts.append(forward_with_cache(dm, cache, x[:, sl], segment_ids=None if seg is None else seg[:, sl]).logits)
            pos = end
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-4, rtol=1e-4)
    for a, b in zip(dm.get_state().memory, full_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not _cpu_kernel.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("opts", [o for o in OPTIONS if o.get("update_rule") != "decoupled"], ids=str)
@pytest.mark.parametrize("mode", ["tsw", "msw"])
def test_compiled_kernel_equals_torch_path(opts, mode):
    """Prefill (fused scan) and token-by-token decode (fused decode kernel) against the differentiable path."""
    dm = _attach(tiny_model("llama"), mode, **opts)
    tokens = ids(2, 23)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :4] = 0

    dm.kernel = "auto"

    def run(grad: bool):
        dm.reset_state(2)
        before = dm.kernel_calls()
        with torch.set_grad_enabled(grad):
            prefill = dm(tokens[:, :15], attention_mask=mask[:, :15]).logits.detach()
            cache = new_cache(dm.base_model.config)
            with torch.no_grad() if not grad else torch.enable_grad():
                steps = [forward_with_cache(dm, cache, tokens[:, t : t + 1]).logits.detach() for t in range(15, 23)]
        used = {k: v - before.get(k, 0) for k, v in dm.kernel_calls().items() if v != before.get(k, 0)}
        layers = len(dm.layer_indices)
        assert used == ({"torch": 9 * layers} if grad else {"numba-scan": layers, "numba-decode": 8 * layers})
        return torch.cat([prefill, *steps], 1), dm.get_state()

    fast_logits, fast_state = run(False)
    slow_logits, slow_state = run(True)
    torch.testing.assert_close(fast_logits, slow_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(fast_state.memory, slow_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_decoupled_takes_the_torch_path():
    dm = _attach(tiny_model("llama"), "tsw", update_rule="decoupled", state_update_mode="lambda_outside")
    dm.kernel = "auto"
    with torch.no_grad():
        dm(ids(1, 5))
    assert dm.kernel_calls() == {"torch": len(dm.layer_indices)}
    dm.kernel = "numba"
    with pytest.raises(KernelUnavailableError, match="decoupled"), torch.no_grad():
        dm(ids(1, 5))


# -- the authors' SSW semantics --------------------------------------------------------------------------------
def _official(model=None, **opts):
    dm = attach(model or tiny_model("qwen3", layers=2), DeltaMemConfig(write_mode="ssw", ssw_semantics="official",
                                                                      chunk_size=4, **opts))
    randomize(dm)
    return dm


def test_official_ssw_state_has_no_open_message():
    dm = _official()
    assert not dm.new_state(1).sequence_write
    with pytest.raises(ValueError, match="layout"):
        dm.set_state(DeltaMemState.zeros(2, 1, 1, 8, sequence_write=True))


def test_every_token_of_a_call_reads_the_state_from_the_start_of_the_call():
    dm = _official()
    x = ids(1, 20)
    seg = torch.tensor([[-1] * 3 + [0] * 5 + [1] * 7 + [2] * 5])
    with torch.no_grad():
        with dm.memory_disabled():
            base = dm(x).logits
        dm.reset_state(1)
        first = dm(x, segment_ids=seg).logits
        assert torch.equal(first, base)  # the state at the start was zero: nothing in the call reads a write
        after_first = dm.get_state()
        assert any(bool(m.abs().sum() > 0) for m in after_first.memory)
        y = ids(1, 9, seed=3)
        second = dm(y, segment_ids=torch.full((1, 9), 3)).logits
        dm.set_state(after_first)
        with dm.writes_disabled():
            read_only = dm(y).logits
    torch.testing.assert_close(second, read_only, rtol=0, atol=0)


def test_unwritten_tokens_and_message_order():
    """Tokens with id −1 do not enter any write; messages are written in ascending id order, once each."""
    dm = _official()
    layer = dm.delta_layers["0"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, 64, generator=g)
    memory = torch.randn(1, 1, 8, 8, generator=g) * 0.3
    seg = torch.tensor([[-1, 4, 4, -1, 1, 1, 1, -1, 4]])
    plan = plan_message_writes(seg, None)
    with torch.no_grad():
        _, got = layer.message_write(x, memory, plan)
        x2 = x.clone()
        x2[0, [0, 3, 7]] = torch.randn(3, 64, generator=g)  # change only the unwritten tokens
        _, got2 = layer.message_write(x2, memory, plan)
        # by hand: the mean of message 1, then of message 4, as two one-token writes
        means = torch.stack([x[0, 4:7].mean(0), x[0, [1, 2, 8]].mean(0)])[None]
        _, expect = layer.token_write(means, memory, None)
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


def test_no_writable_token_means_token_writes_as_their_code():
    """No ids (or only −1 in the whole batch): every token is written, exactly as TSW with the same weights."""
    model = tiny_model("qwen3", layers=2)
    dm = _official(model)
    tsw = attach(tiny_model("qwen3", layers=2), DeltaMemConfig(write_mode="tsw", chunk_size=4))
    tsw.load_adapter_state_dict(dm.adapter_state_dict())
    x = ids(2, 11)
    with torch.no_grad():
        tsw.reset_state(2)
        expect = tsw(x).logits
        for seg in (None, torch.full((2, 11), -1)):
            dm.reset_state(2)
            torch.testing.assert_close(dm(x, segment_ids=seg).logits, expect, rtol=0, atol=1e-6)
            for a, b in zip(dm.get_state().memory, tsw.get_state().memory, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_message_plan_per_row():
    seg = torch.tensor([[-1, 7, 7, 2, -1], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 3]])
    mask = torch.tensor([[True] * 5, [True] * 5, [False, True, True, True, True]])
    plan = plan_message_writes(seg, mask)
    assert plan.num_slots == 3
    assert plan.token_slot.tolist() == [[3, 1, 1, 0, 3], [3, 3, 3, 3, 3], [3, 0, 1, 2, 2]]
    assert plan.counts.tolist() == [[1, 2, 0], [0, 0, 0], [1, 1, 2]]
    assert plan.write_valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert plan_message_writes(torch.full((2, 3), -1), None) is None
    with pytest.raises(ValueError, match="-1"):
        plan_message_writes(torch.tensor([[0, -2]]), None)


def test_official_ssw_trains():
    dm = _official(update_rule="decoupled", state_update_mode="lambda_outside")
    x = ids(2, 12)
    seg = torch.tensor([[0] * 4 + [1] * 8, [-1] * 2 + [5] * 10])
    dm.reset_state(2)
    dm(x, segment_ids=seg)  # write
    with dm.writes_disabled():
        loss = dm(ids(2, 5, seed=2)).logits.square().mean()
    loss.backward()
    layer = dm.delta_layers["1"]
    for p in (layer.in_proj, layer.beta_bias, layer.lambda_proj, layer.delta_q):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


# -- the state dtype ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "state"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float64, torch.float64)])
def test_state_dtype_follows_the_model_only_for_float64(dtype, state):
    dm = attach(tiny_model("llama").to(dtype), DeltaMemConfig(write_mode="ssw"))
    randomize(dm)
    assert dm.state_dtype == state and dm.new_state(1).memory[0].dtype == state
    dm.reset_state(1)
    with torch.no_grad():
        dm(ids(1, 5), segment_ids=torch.tensor([[0, 0, 1, 1, 1]]))
    s = dm.get_state()
    assert s.memory[0].dtype == state and s.pending_sum[0].dtype == state
    assert DeltaMemState.from_tensors(s.to_tensors()).equal(s)
