"""Adapter options beyond the paper (update rules, query init, layer presets): the model-level invariants still
hold, the paper's configuration is unchanged by default, and bad values are refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ids, randomize, tiny_model

from deltamem_agents import DeltaMemConfig, attach, load_adapter, save_adapter
from deltamem_agents.models.kv_cache import forward_with_cache, new_cache

RULES = ("decoupled", "delta")


def test_defaults_are_the_papers_configuration():
    c = DeltaMemConfig()
    assert (c.update_rule, c.query_init, c.target_layers) == ("coupled", "random", None)
    dm = attach(tiny_model("llama"), c)
    names = set(dm.adapter_state_dict())
    assert not any("lambda" in n for n in names)  # no extra tensors in the paper's adapter


@pytest.mark.parametrize(("rule", "mode"), [(r, m) for r in RULES for m in ("tsw", "msw", "ssw")
                                             if (r, m) != ("decoupled", "ssw")])  # refused by the config (below)
def test_zero_state_is_the_base_model_and_prefill_then_decode_equals_full_pass(rule, mode):
    model = tiny_model("llama", layers=3)
    x = ids(2, 37)
    with torch.no_grad():
        base = model(x).logits
    dm = attach(model, DeltaMemConfig(write_mode=mode, update_rule=rule, chunk_size=8))
    randomize(dm)
    seg = torch.tensor([0] * 6 + [1] * 11 + [2] * 9 + list(range(3, 14)))[None].repeat(2, 1) if mode == "ssw" else None
    with torch.no_grad():
        dm.reset_state(2)
        with dm.writes_disabled():
            assert torch.equal(dm(x).logits, base)
        dm.reset_state(2)
        full = dm(x, segment_ids=seg).logits
        assert not torch.equal(full, base)
        full_state = dm.get_state()
        dm.reset_state(2)
        cache = new_cache(model.config)
        parts, pos = [], 0
        for end in (9, 26, *range(27, 38)):
            sl = slice(pos, end)
            parts.append(forward_with_cache(dm, cache, x[:, sl], segment_ids=None if seg is None else seg[:, sl]).logits)
            pos = end
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-4, rtol=1e-4)
    for a, b in zip(dm.get_state().memory, full_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_delta_rule_does_not_decay_between_writes():
    """λ = 1 with the write gate closed (β = 0 after the first token): the state stays what token 0 wrote."""
    dm = attach(tiny_model("llama"), DeltaMemConfig(update_rule="delta"))
    randomize(dm)
    with torch.no_grad():
        x = ids(1, 12)
        dm.reset_state(1)
        dm(x[:, :1])
        after_first = [m.clone() for m in dm.get_state().memory]
        for layer in dm.delta_layers.values():
            layer.beta_bias.fill_(-1e4)  # β = 0: nothing is written, and under λ = 1 nothing fades
        dm(x[:, 1:])
    for a, b in zip(dm.get_state().memory, after_first, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", RULES)
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, rule):
    model = tiny_model("qwen3")
    dm = attach(model, DeltaMemConfig(update_rule=rule, query_init="key", target_layers="upper_half"))
    randomize(dm)
    x = ids(1, 15)
    with torch.no_grad():
        dm.reset_state(1)
        want = dm(x).logits
    save_adapter(dm, tmp_path / "a")
    dm.detach_adapter()
    again = load_adapter(tiny_model("qwen3"), tmp_path / "a")
    assert again.config.update_rule == rule and again.layer_indices == (1,)
    with torch.no_grad():
        again.reset_state(1)
        assert torch.equal(again(x).logits, want)


def test_query_init_key_copies_the_key_projection():
    dm = attach(tiny_model("llama"), DeltaMemConfig(query_init="key"))
    for layer in dm.delta_layers.values():
        q, k = layer.in_proj.split(layer.config.state_width, dim=0)[:2]
        assert torch.equal(q, k)
    dm2 = attach(tiny_model("llama"), DeltaMemConfig())
    for layer in dm2.delta_layers.values():
        q, k = layer.in_proj.split(layer.config.state_width, dim=0)[:2]
        assert not torch.equal(q, k)


def test_decoupled_retention_starts_at_its_bias():
    dm = attach(tiny_model("llama"), DeltaMemConfig(update_rule="decoupled", lambda_bias_init=3.0))
    layer = next(iter(dm.delta_layers.values()))
    x = torch.randn(2, 5, layer.in_proj.shape[1])
    _, _, _, beta = layer.split(layer.project(x))
    torch.testing.assert_close(layer.retention(x, beta), torch.full_like(beta, torch.sigmoid(torch.tensor(3.0)).item()))


@pytest.mark.parametrize(("preset", "layers"), [("upper_half", (4, 5, 6, 7, 8)), ("middle_half", (2, 3, 4, 5, 6)),
                                                ("last_quarter", (7, 8))])
def test_layer_presets_resolve_against_the_models_depth(preset, layers):
    assert DeltaMemConfig(target_layers=preset).resolve_layers(9) == layers
    c = DeltaMemConfig(target_layers=preset)
    assert DeltaMemConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"update_rule": "linear"}, "update_rule"),
    ({"query_init": "value"}, "query_init"),
    ({"target_layers": "top"}, "preset"),
    ({"lambda_bias_init": "5"}, "lambda_bias_init"),
    ({"update_rule": "decoupled", "write_mode": "ssw"}, "not supported"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaMemConfig(**kwargs)


def test_out_of_range_layers_are_refused_at_attach():
    with pytest.raises(ValueError, match="out of range"):
        attach(tiny_model("llama"), DeltaMemConfig(target_layers=(0, 5)))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_ov_svd_init_is_the_best_low_rank_copy_of_the_value_output_map(arch):
    """``scale · W_o^Δ W_v^m`` equals the rank-r truncated SVD of o_proj ∘ repeat_kv ∘ v_proj, and a zero state
    is still exactly the base model."""
    from transformers.models.llama.modeling_llama import repeat_kv

    model = tiny_model(arch)
    x = ids(1, 9)
    with torch.no_grad():
        base = model(x).logits
    dm = attach(model, DeltaMemConfig(init="ov_svd", rank=4, alpha=8))
    attn = model.model.layers[0].self_attn
    kv = model.config.num_key_value_heads
    w_v = attn.v_proj.weight.view(kv, attn.head_dim, -1).unsqueeze(0)  # (1, kv, hd, d) as (B, heads, T, ·)
    full_v = repeat_kv(w_v, model.config.num_attention_heads // kv).reshape(-1, w_v.shape[-1])
    ov = attn.o_proj.weight @ full_v
    U, S, Vh = torch.linalg.svd(ov)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    layer = dm.delta_layers["0"]
    got = layer.scale * layer.delta_o @ layer.in_proj[8:12]
    torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
    assert torch.equal(layer.delta_q, torch.zeros_like(layer.delta_q))
    with torch.no_grad():
        dm.reset_state(1)
        with dm.writes_disabled():
            assert torch.equal(dm(x).logits, base)
