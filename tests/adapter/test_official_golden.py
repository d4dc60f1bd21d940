"""Golden tests: files written by the authors' code (declare-lab/delta-Mem @ 5cd5d91) imported with our importer
give the logits and states their code computed.

Fixtures: ``tests/fixtures/official-deltamem/`` (README there). Each case has a random fp64 base (``base/``,
``save_pretrained`` output), the adapter exactly as their ``save_delta_mem_adapter`` wrote it, the inputs and the
expected tensors their model computed (HF eager attention with an fp64 softmax). We run the base under sdpa in
fp64 and compare:

* with the memory path in fp64 (the default state dtype of an fp64 model): ≤ 1e-9;
* with an fp32 state on the same fp64 base (our memory arithmetic in fp32): ≤ 1e-5;
* with the whole model in fp32 (base and adapter; the compiled CPU kernel where it covers the rule): ≤ 5e-5.

``logits_full`` is one forward from a zero state; ``logits_prefill_decode`` the ``calls`` of ``inputs.json`` run
with our KV cache handling (``forward_with_cache``), message ids passed as ``segment_ids``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltamem_agents import attach, import_official_adapter
from deltamem_agents.adapter import DeltaMemModel, _cpu_kernel
from deltamem_agents.models.kv_cache import forward_with_cache, new_cache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-deltamem"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "inputs.json").is_file())
TOLERANCE = {"fp64": 1e-9, "fp32-state": 1e-5, "fp32-model": 5e-5}


def _inputs(case: str) -> dict:
    return json.loads((FIXTURES / case / "inputs.json").read_text())


def _base(case: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    base_dir = (FIXTURES / case / _inputs(case)["base_dir"]).resolve()
    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, attn_implementation="sdpa").eval()


def _segment_ids(call: dict, length: int) -> torch.Tensor | None:
    if call.get("message_ids") is not None:
        return torch.tensor([call["message_ids"]], dtype=torch.long)
    if call.get("message_id") is not None:
        return torch.full((1, length), int(call["message_id"]), dtype=torch.long)
    return None


@torch.no_grad()
def _run(dm: DeltaMemModel, inputs: dict, state_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our tensors under the fixture's protocols, named as in ``expected.safetensors``."""
    ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
    got: dict[str, torch.Tensor] = {}

    def reset() -> None:
        dm.set_state(dm.new_state(1, dtype=state_dtype))

    if inputs["full_forward"]:
        a, b = inputs["full_forward"]["input_ids_slice"]
        reset()
        got["logits_full"] = dm(input_ids=ids[:, a:b]).logits
        got.update({f"state_layer{i}": m for i, m in enumerate(dm.state.memory)})
    if inputs["calls"]:
        reset()
        cache, logits = new_cache(dm.base_model.config), []
        for call in inputs["calls"]:
            x = ids[:, call["start"] : call["end"]]
            logits.append(forward_with_cache(dm, cache, x, segment_ids=_segment_ids(call, x.shape[1])).logits)
        got["logits_prefill_decode"] = torch.cat(logits, dim=1)
        got.update({f"state_calls_layer{i}": m for i, m in enumerate(dm.state.memory)})
    return got


def _max_diffs(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(got) == set(expected), f"tensors {sorted(got)} vs expected {sorted(expected)}"
    # our state is (B, N, r, r); theirs (B, r, r) for one sub-state
    return {k: float((got[k].double().reshape(v.shape) - v).abs().max()) for k, v in expected.items()}


def test_every_case_is_present():
    assert {"qwen3-tsw", "qwen3-msw", "smollm3-tsw", "qwen3-ssw-per-call"} <= set(CASES)


@pytest.mark.parametrize("memory", ["fp64", "fp32-state"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_states_match_the_authors_code(case, memory):
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    dm = import_official_adapter(_base(case, torch.float64), FIXTURES / case / "adapter")
    assert dm.state_dtype == torch.float64
    got = _run(dm, _inputs(case), torch.float64 if memory == "fp64" else torch.float32)
    diffs = _max_diffs(got, expected)
    assert max(diffs.values()) <= TOLERANCE[memory], diffs


@pytest.mark.parametrize("case", CASES)
def test_the_memory_matters_in_every_case(case):
    """The expected logits are far from the plain base's (so the comparison above can fail)."""
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    dm = import_official_adapter(_base(case, torch.float64), FIXTURES / case / "adapter")
    ids = torch.tensor(_inputs(case)["input_ids"])
    key = "logits_full" if "logits_full" in expected else "logits_prefill_decode"
    with torch.no_grad(), dm.memory_disabled():
        plain = dm(input_ids=ids[:, : expected[key].shape[1]]).logits
    assert float((plain - expected[key]).abs().max()) > 1.0


@pytest.mark.parametrize("case", CASES)
def test_fp32_model_with_the_compiled_kernel(case):
    """The whole model in fp32 (the fixtures' weights are fp32-representable): the inference fast path."""
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    dm = import_official_adapter(_base(case, torch.float32), FIXTURES / case / "adapter")
    dm.kernel = "auto"
    diffs = _max_diffs(_run(dm, _inputs(case)), expected)
    assert max(diffs.values()) <= TOLERANCE["fp32-model"], diffs
    covered = dm.delta_layers["0"].kernels.numba_rule is not None and dm.config.write_mode != "ssw"
    calls = dm.kernel_calls()
    if _cpu_kernel.AVAILABLE and covered:
        assert calls.get("numba-scan", 0) + calls.get("numba-decode", 0) > 0, calls


def _settings(case: str) -> dict:
    return json.loads((FIXTURES / case / "adapter" / "delta_mem_config.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_config_mapping(case):
    s = _settings(case)
    cfg = import_official_adapter(_base(case, torch.float64), FIXTURES / case / "adapter").config
    assert (cfg.rank, cfg.alpha, cfg.num_states) == (s["rank"], s["alpha"], s["num_state_heads"])
    assert cfg.branches == ("q", "o") and cfg.normalize_qk == s["normalize_qk"]
    ssw = s["memory_write_granularity"] == "message_mean"
    assert cfg.write_mode == ("ssw" if ssw else "msw" if s["num_state_heads"] > 1 else "tsw")
    assert cfg.ssw_semantics == ("official" if ssw else "ours")
    assert cfg.update_rule == ("delta" if s["state_update_mode"] == "no_lambda"
                               else "coupled" if s["couple_lambda"] else "decoupled")
    assert cfg.state_update_mode == ("lambda_outside" if s["state_update_mode"] == "lambda_outside" else "standard")


@pytest.mark.parametrize("case", ["qwen3-ssw-per-call", "qwen3-ssw-message-ids"])
def test_our_ssw_semantics_differ_by_design(case):
    """The same SSW weights under our semantics (one write per message across calls) give other logits: the
    authors' semantics is an option, picked by the importer for their SSW adapters."""
    inputs = _inputs(case)
    theirs = import_official_adapter(_base(case, torch.float64), FIXTURES / case / "adapter")
    ours = attach(_base(case, torch.float64), dataclasses.replace(theirs.config, ssw_semantics="ours"))
    ours.load_adapter_state_dict(theirs.adapter_state_dict())
    calls = []
    for c in inputs["calls"]:  # our ids must not decrease and have no −1: give such tokens the previous id
        ids = _segment_ids(c, c["end"] - c["start"])
        calls.append(dict(c, message_id=None, message_ids=None if ids is None else ids.clamp_min(0)[0].tolist()))
    prev = 0
    for c in calls:
        if c["message_ids"] is not None:
            c["message_ids"] = [prev := max(prev, i) for i in c["message_ids"]]
    a = _run(theirs, inputs)["logits_prefill_decode"]
    b = _run(ours, dict(inputs, calls=calls))["logits_prefill_decode"]
    assert float((a - b).abs().max()) > 0.1
