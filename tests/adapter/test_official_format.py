"""The authors' release format: what their saver writes imports; every other value of their config, and every
unexpected tensor, is refused with a typed error naming it, and leaves the model unchanged.

The files start from an adapter their ``save_delta_mem_adapter`` wrote (``tests/fixtures/official-deltamem``);
a test changes one field or one tensor at a time."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltamem_agents import import_official_adapter
from deltamem_agents.adapter import (
    AdapterMismatchError,
    OfficialTensorError,
    UnsupportedOfficialConfigError,
    attach,
    config_from_official,
    resolve_adapter,
)
from deltamem_agents.adapter.official import OFFICIAL_DEFAULTS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-deltamem"
TSW = FIXTURES / "qwen3-tsw" / "adapter"
BASE = FIXTURES / "qwen3-tsw" / "base"


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float64, attn_implementation="sdpa").eval()


def _copy(tmp_path: Path, src: Path = TSW, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of an adapter directory, with a changed config and/or state dict."""
    out = tmp_path / "adapter"
    shutil.copytree(src, out)
    if config is not None:
        (out / "delta_mem_config.json").write_text(json.dumps(config, indent=2))
    if tensors is not None:
        torch.save(tensors, out / "delta_mem_adapter.pt")
    return out


def _settings(src: Path = TSW) -> dict:
    return json.loads((src / "delta_mem_config.json").read_text())


def _tensors(src: Path = TSW) -> dict:
    return torch.load(src / "delta_mem_adapter.pt", map_location="cpu", weights_only=True)


def test_every_field_their_saver_writes_is_known():
    for case in FIXTURES.iterdir():
        if (case / "adapter").is_dir():
            assert set(_settings(case / "adapter")) == set(OFFICIAL_DEFAULTS)


def test_their_file_maps_onto_our_fused_layout():
    sd = _tensors()
    assert {k.rsplit(".", 1)[1] for k in sd} >= {"delta_k_proj", "delta_v_proj"}  # written though inactive
    dm = import_official_adapter(_base(), TSW)
    assert dm.layer_indices == (0, 1, 2)
    layer = dm.delta_layers["1"]
    pre = "model.layers.1.self_attn."
    for block, name in enumerate(("memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj")):
        assert torch.equal(layer.in_proj[8 * block : 8 * (block + 1)], sd[pre + name])
    assert torch.equal(layer.beta_bias, sd[pre + "beta_bias"])
    assert torch.equal(layer.delta_q, sd[pre + "delta_q_proj"]) and torch.equal(layer.delta_o, sd[pre + "delta_o_proj"])


def test_resolve_adapter_picks_the_authors_format():
    dm = resolve_adapter(_base(), TSW)
    assert dm.config.write_mode == "tsw" and dm.config.init == "zero"


def test_a_nonzero_inactive_correction_is_refused_by_name(tmp_path):
    sd = _tensors()
    sd["model.layers.1.self_attn.delta_k_proj"][0, 0] = 0.5
    model = _base()
    with pytest.raises(OfficialTensorError, match="delta_k_proj") as info:
        import_official_adapter(model, _copy(tmp_path, tensors=sd))
    assert info.value.tensor == "model.layers.1.self_attn.delta_k_proj"
    attach(model)  # the model was left unchanged: attaching again works


def test_inactive_corrections_may_be_absent(tmp_path):
    sd = {k: v for k, v in _tensors().items() if not k.endswith(("delta_k_proj", "delta_v_proj"))}
    dm = import_official_adapter(_base(), _copy(tmp_path, tensors=sd))
    assert dm.config.branches == ("q", "o")


def test_an_inactive_q_correction_must_be_zero(tmp_path):
    settings = dict(_settings(), delta_heads=["o"])
    dir_ = _copy(tmp_path, config=settings)
    with pytest.raises(OfficialTensorError, match="delta_q_proj"):
        import_official_adapter(_base(), dir_)
    sd = _tensors()
    for k in sd:
        if k.endswith("delta_q_proj"):
            sd[k].zero_()
    torch.save(sd, dir_ / "delta_mem_adapter.pt")
    dm = import_official_adapter(_base(), dir_)
    assert dm.config.branches == ("o",) and dm.delta_layers["0"].delta_q is None


REFUSED = [
    ("delta_heads", ["q", "k", "o"]),
    ("delta_heads", []),
    ("rankwise_gates", False),
    ("delta_o_rmsnorm", True),
    ("trainable_delta_scale", True),
    ("memory_write_granularity", "sentence_mean"),
    ("state_update_mode", "sideways"),
    ("output_init", "orthogonal"),
    ("target_modules", ["mlp"]),
    ("num_memory_partitions", 2),
    ("num_global_memory_partitions", 1),
    ("memory_partition_routing", "hard"),
    ("memory_partition_basis", "private"),
    ("tie_memory_partition_read_write", True),
    ("memory_partition_read_mode", "sigmoid"),
    ("slot_read_top_k", 2),
    ("global_memory_mode", "read_only"),
    ("global_memory_read_top_k", 1),
    ("global_memory_merge_mode", "add"),
    ("memory_reader_layers", [1]),
    ("memory_readout_mode", "synthetic_kv"),
    ("memory_write_source", "raw_hidden"),
    ("memory_write_proposals_per_message", 3),
    ("synthetic_memory_slots", 2),
    ("latent_memory_layers", [0]),
    ("num_memory_partitions", True),  # true is not 1
    ("latent_gate_init", "small"),  # unused, but still type-checked
    ("normalize_qk", "yes"),
    ("rank", 0),
    ("bogus_field", 1),
]


@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f"{f}={v!r}" for f, v in REFUSED])
def test_unsupported_config_values_are_refused_by_name(tmp_path, field, value):
    settings = dict(_settings(), **{field: value})
    with pytest.raises(UnsupportedOfficialConfigError, match=field) as info:
        config_from_official(settings)
    assert info.value.field == field and info.value.value == value
    model = _base()
    with pytest.raises(UnsupportedOfficialConfigError):
        import_official_adapter(model, _copy(tmp_path, config=settings))
    attach(model)


def test_missing_fields_take_their_defaults():
    settings = _settings()
    del settings["delta_heads"]  # their default corrects q, k, v and o
    with pytest.raises(UnsupportedOfficialConfigError, match="delta_heads"):
        config_from_official(settings)
    cfg = config_from_official({"delta_heads": ["q", "o"]})
    assert (cfg.rank, cfg.alpha, cfg.write_mode, cfg.update_rule, cfg.normalize_qk) == (8, 16.0, "tsw", "coupled", True)


def test_honoured_options_map_onto_our_config():
    base = dict(_settings())
    assert config_from_official(dict(base, state_update_mode="no_lambda")).update_rule == "delta"
    c = config_from_official(dict(base, state_update_mode="lambda_outside", couple_lambda=False))
    assert (c.update_rule, c.state_update_mode) == ("decoupled", "lambda_outside")
    c = config_from_official(dict(base, memory_write_granularity="message_mean"))
    assert (c.write_mode, c.ssw_semantics) == ("ssw", "official")
    with pytest.raises(UnsupportedOfficialConfigError, match="num_state_heads"):
        config_from_official(dict(base, memory_write_granularity="message_mean", num_state_heads=4))
    assert config_from_official(dict(base, target_layers=[2, 0])).target_layers == (0, 2)
    assert config_from_official(dict(base, delta_heads="q,o")).branches == ("q", "o")  # their string form
    c = config_from_official(dict(base, output_init="zero", beta_bias_init=-3.0, online_gain=0.1))
    assert c.beta_bias_init == -3.0  # initialisation only: the loaded weights decide
    with pytest.raises(AdapterMismatchError, match="alpha"):
        config_from_official(dict(base, alpha=-1.0))


def test_lambda_tensors(tmp_path):
    sd = _tensors()
    extra = dict(sd)
    for i in range(3):
        extra[f"model.layers.{i}.self_attn.lambda_proj"] = torch.zeros(8, 64, dtype=torch.float64)
        extra[f"model.layers.{i}.self_attn.lambda_bias"] = torch.full((8,), 1.5, dtype=torch.float64)
    with pytest.raises(OfficialTensorError, match="lambda_"):  # couple_lambda=true: no λ projection
        import_official_adapter(_base(), _copy(tmp_path / "a", tensors=extra))
    no_lambda = dict(_settings(), state_update_mode="no_lambda", couple_lambda=False)
    dm = import_official_adapter(_base(), _copy(tmp_path / "b", config=no_lambda, tensors=extra))
    assert dm.config.update_rule == "delta"  # λ = 1: their λ projection is never used, so it is ignored
    decoupled = dict(_settings(), couple_lambda=False)
    with pytest.raises(OfficialTensorError, match="lambda_proj.*missing"):
        import_official_adapter(_base(), _copy(tmp_path / "c", config=decoupled, tensors=sd))


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape", "layers"])
def test_bad_tensor_files_are_refused(tmp_path, change):
    sd = _tensors()
    if change == "missing":
        del sd["model.layers.2.self_attn.beta_bias"]
        err, match = OfficialTensorError, "layers.2.self_attn.beta_bias: missing"
    elif change == "unexpected":
        sd["model.layers.0.self_attn.surprise"] = torch.zeros(1)
        err, match = OfficialTensorError, "surprise"
    elif change == "shape":
        sd["model.layers.0.self_attn.memory_v_proj"] = torch.zeros(8, 32, dtype=torch.float64)
        err, match = OfficialTensorError, r"memory_v_proj: has shape \(8, 32\)"
    else:
        sd = {k: v for k, v in sd.items() if ".layers.2." not in k}
        err, match = AdapterMismatchError, "holds layers"
    model = _base()
    with pytest.raises(err, match=match):
        import_official_adapter(model, _copy(tmp_path, tensors=sd))
    attach(model)


def test_a_pickle_with_objects_is_refused(tmp_path):
    sd = dict(_tensors(), note=datetime.datetime(2026, 1, 1))
    with pytest.raises(AdapterMismatchError, match="not a plain tensor state dict"):
        import_official_adapter(_base(), _copy(tmp_path, tensors=sd))


def test_a_safetensors_conversion_imports_the_same(tmp_path):
    out = _copy(tmp_path)
    save_file({k: v.contiguous() for k, v in _tensors().items()}, str(out / "delta_mem_adapter.safetensors"))
    with pytest.raises(AdapterMismatchError, match="both"):
        import_official_adapter(_base(), out)
    (out / "delta_mem_adapter.pt").unlink()
    a, b = import_official_adapter(_base(), out), import_official_adapter(_base(), TSW)
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="delta_mem_config.json"):
        import_official_adapter(_base(), tmp_path)
    out = _copy(tmp_path)
    (out / "delta_mem_adapter.pt").unlink()
    with pytest.raises(FileNotFoundError, match="delta_mem_adapter.pt"):
        import_official_adapter(_base(), out)
