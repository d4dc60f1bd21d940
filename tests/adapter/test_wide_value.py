"""The wide-value option (beyond the paper): the memory stores attention inputs and its read is decoded by the
layer's own frozen v_proj/o_proj. Model-level invariants, the decode's meaning, and its refusals."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, ids, randomize, tiny_model

from deltamem_agents import DeltaMemConfig, attach, load_adapter, save_adapter
from deltamem_agents.adapter.state import DeltaMemState
from deltamem_agents.models.kv_cache import forward_with_cache, new_cache


def _wide(**kw):
    return DeltaMemConfig(wide_value=True, branches=("o",), **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_state_and_zero_gain_are_exactly_the_base_model(arch):
    model = tiny_model(arch)
    x = ids(2, 17)
    with torch.no_grad():
        base = model(x).logits
        dm = attach(model, _wide())
        dm.reset_state(2)
        assert tuple(dm.state.memory[0].shape) == (2, 1, 64, 8)
        assert torch.equal(dm(x).logits, base)  # gain 0: a written state changes nothing yet
        assert dm.state.memory[0].abs().sum() > 0
        randomize(dm)  # nonzero gain and projections
        dm.reset_state(2)
        with dm.writes_disabled():
            assert torch.equal(dm(x).logits, base)  # S = 0 reads 0, whatever the gain
        dm.reset_state(2)
        assert not torch.equal(dm(x).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("mode", "rule"), [("tsw", "coupled"), ("tsw", "delta"), ("msw", "decoupled")])
def test_chunked_prefill_then_decode_equals_full_pass(arch, mode, rule):
    model = tiny_model(arch)
    dm = attach(model, _wide(write_mode=mode, update_rule=rule, chunk_size=8))
    randomize(dm, scale=0.5)
    x = ids(2, 29)
    with torch.no_grad():
        dm.reset_state(2)
        full = dm(x).logits
        full_state = dm.get_state()
        dm.reset_state(2)
        cache = new_cache(model.config)
        parts, pos = [], 0
        for end in (10, 21, *range(22, 30)):
            parts.append(forward_with_cache(dm, cache, x[:, pos:end]).logits)
            pos = end
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-4, rtol=1e-4)
    for a, b in zip(dm.get_state().memory, full_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_read_of_one_written_hidden_state_decodes_as_attention_to_it():
    """One write (β = 1, λ irrelevant from zero) of x under key k, read with q = k: the read is x itself and the
    added output is exactly o_proj(repeat_kv(v_proj(x))) — a head attending with weight 1 to that token."""
    from transformers.models.llama.modeling_llama import repeat_kv

    model = tiny_model("llama")
    dm = attach(model, _wide(query_init="key", wide_gain_init=1.0))
    layer = dm.delta_layers["0"]
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, generator=g)
    with torch.no_grad():
        layer.beta_bias.fill_(1e4)  # β = 1
        memory = torch.zeros(1, 1, 64, 8)
        _, memory = layer.token_write(x, memory, None)
        read = layer.read_only(x, memory)  # same hidden state → q = k
        torch.testing.assert_close(read, x, atol=1e-5, rtol=1e-5)
        out = layer.wide_output(torch.zeros(1, 1, 64), read, attn.v_proj.weight, attn.o_proj.weight, attn.head_dim)
        kv = model.config.num_key_value_heads
        v = (x @ attn.v_proj.weight.T).view(1, 1, kv, attn.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        heads = repeat_kv(v, model.config.num_attention_heads // kv).transpose(1, 2).reshape(1, 1, -1)
        torch.testing.assert_close(out, heads @ attn.o_proj.weight.T, atol=1e-5, rtol=1e-5)


def test_save_load_and_state_round_trip_give_identical_logits(tmp_path):
    model = tiny_model("qwen3")
    dm = attach(model, _wide(update_rule="delta", target_layers="upper_half"))
    randomize(dm)
    x = ids(1, 11)
    with torch.no_grad():
        dm.reset_state(1)
        dm(x[:, :6])
        saved = DeltaMemState.from_tensors(dm.get_state().to_tensors())
        with dm.writes_disabled():
            want = dm(x[:, 6:]).logits
    save_adapter(dm, tmp_path / "a")
    dm.detach_adapter()
    again = load_adapter(tiny_model("qwen3"), tmp_path / "a")
    assert again.config.wide_value and again.value_width == 64
    again.set_state(saved)
    with torch.no_grad(), again.writes_disabled():
        assert torch.equal(again(x[:, 6:]).logits, want)


def test_wide_value_gradients_reach_gain_keys_and_gates():
    dm = attach(tiny_model("llama"), _wide(wide_gain_init=0.5))
    dm.reset_state(1)
    dm(ids(1, 9)).logits.square().mean().backward()
    layer = dm.delta_layers["1"]
    for p in (layer.in_proj, layer.beta_bias, layer.wide_gain):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"wide_value": True}, "branches"),
    ({"wide_value": True, "branches": ("o",), "write_mode": "ssw"}, "ssw"),
    ({"wide_value": "yes"}, "wide_value"),
    ({"wide_gain_init": None}, "wide_gain_init"),
])
def test_bad_wide_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaMemConfig(**kwargs)


def test_a_square_state_is_refused_by_a_wide_adapter():
    dm = attach(tiny_model("llama"), _wide())
    with pytest.raises(ValueError, match="expected"):
        dm.set_state(DeltaMemState.zeros(2, 1, 1, 8))
