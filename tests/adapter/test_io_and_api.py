"""Config validation, architecture table, state API, save/load (the authors' format: test_official_*.py)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ids, randomize, tiny_model

from deltamem_agents import (
    DeltaMemConfig,
    DeltaMemState,
    attach,
    load_adapter,
    save_adapter,
)
from deltamem_agents.adapter import AdapterMismatchError, UnsupportedArchitectureError, read_adapter_metadata


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank"),
        ({"alpha": -1}, "alpha"),
        ({"write_mode": "xyz"}, "write_mode"),
        ({"write_mode": "msw", "num_states": 1}, "num_states"),
        ({"write_mode": "tsw", "num_states": 4}, "msw"),
        ({"branches": ("k",)}, "branches"),
        ({"branches": ()}, "branches"),
        ({"init": "random"}, "init"),
        ({"target_layers": (1, 1)}, "duplicates"),
        ({"target_layers": (-1,)}, "target_layers"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"state_update_mode": "no_lambda"}, "update_rule='delta'"),
        ({"state_update_mode": "sideways"}, "state_update_mode"),
        ({"normalize_qk": 1}, "normalize_qk"),
        ({"ssw_semantics": "theirs", "write_mode": "ssw"}, "ssw_semantics"),
        ({"ssw_semantics": "official"}, "write_mode 'ssw' only"),
        ({"write_mode": "ssw", "update_rule": "decoupled"}, "ssw_semantics='official'"),
        ({"wide_value": True, "branches": ("o",), "state_update_mode": "lambda_outside"}, "standard"),
    ],
)
def test_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaMemConfig(**kwargs)


def test_config_defaults_and_round_trip():
    assert DeltaMemConfig().num_states == 1
    assert DeltaMemConfig(write_mode="msw").num_states == 4
    cfg = DeltaMemConfig(write_mode="ssw", target_layers=(3, 1), branches=("o", "q"))
    assert cfg.target_layers == (1, 3) and cfg.branches == ("q", "o")
    assert DeltaMemConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DeltaMemConfig.from_dict({"rank": 8, "bogus": 1})


def test_the_authors_options_default_to_the_paper_and_change_the_fingerprint():
    from deltamem_agents.adapter.io import tensors_fingerprint

    c = DeltaMemConfig()
    assert (c.state_update_mode, c.normalize_qk, c.ssw_semantics) == ("standard", True, "ours")
    assert DeltaMemConfig(write_mode="ssw", update_rule="decoupled", ssw_semantics="official").keeps_open_message is False
    t = {"x": torch.zeros(2)}
    prints = {tensors_fingerprint(t, cfg) for cfg in (
        c, DeltaMemConfig(state_update_mode="lambda_outside"), DeltaMemConfig(normalize_qk=False),
        DeltaMemConfig(write_mode="ssw"), DeltaMemConfig(write_mode="ssw", ssw_semantics="official"))}
    assert len(prints) == 5


def test_unknown_architecture_error_names_what_is_missing():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="q_proj"):
        attach(model)


def test_generic_architecture_with_q_and_o_proj_is_accepted():
    model = tiny_model("llama")
    model.config.model_type = "my_llama_fork"  # not in the table, same layout
    dm = attach(model, DeltaMemConfig(target_layers=(1,)))
    assert dm.layer_indices == (1,) and "generic" in dm.spec.name
    with pytest.raises(ValueError, match="out of range"):
        attach(tiny_model("llama"), DeltaMemConfig(target_layers=(5,)))


def test_state_rows_can_be_read_and_set():
    dm = attach(tiny_model("llama"), DeltaMemConfig())
    randomize(dm)
    with torch.no_grad():
        dm.reset_state(3)
        dm(ids(3, 7))
    full = dm.get_state()
    row1 = dm.get_state(rows=1)
    assert row1.batch_size == 1 and torch.equal(row1.memory[0][0], full.memory[0][1])
    dm.set_state(dm.new_state(1), rows=1)  # clear one row only
    assert dm.state.memory[0][1].abs().sum() == 0 and torch.equal(dm.state.memory[0][0], full.memory[0][0])
    with pytest.raises(ValueError, match="batch size"):
        dm(ids(2, 4))
    bad = full.clone()
    bad.memory[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dm.set_state(bad)
    with pytest.raises(ValueError, match="layers"):
        dm.set_state(DeltaMemState.zeros(5, 1, 1, 8))
    restored = DeltaMemState.from_tensors(full.to_tensors())
    assert restored.equal(full)
    assert DeltaMemState.cat([full.select(0), full.select([1, 2])]).equal(full)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    dm = attach(tiny_model("qwen3"), DeltaMemConfig(write_mode="msw"))
    randomize(dm)
    x = ids(1, 12)
    with torch.no_grad():
        dm.reset_state(1)
        expected = dm(x).logits
    save_adapter(dm, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = read_adapter_metadata(tmp_path / "ad")
    assert meta["base_model"]["model_type"] == "qwen3" and len(meta["base_model_fingerprint"]) == 64

    loaded = load_adapter(tiny_model("qwen3"), tmp_path / "ad")
    with torch.no_grad():
        loaded.reset_state(1)
        assert torch.equal(loaded(x).logits, expected)


def test_load_refuses_another_base_model_and_corrupt_files(tmp_path):
    dm = attach(tiny_model("llama"), DeltaMemConfig())
    randomize(dm)
    save_adapter(dm, tmp_path)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        load_adapter(tiny_model("llama", seed=7), tmp_path)  # same architecture, other weights
    load_adapter(tiny_model("llama", seed=7), tmp_path, check_base="ignore")
    with pytest.raises(AdapterMismatchError, match="architecture"):
        load_adapter(tiny_model("llama", layers=3), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    model = tiny_model("llama")
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        load_adapter(model, tmp_path)
    # the refused load left the model as it was: no adapter attached, no projection intercepted
    assert not hasattr(model, "delta_layers") and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # save_adapter writes through temporaries: nothing but the two files is left in the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
