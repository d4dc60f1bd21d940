"""The GPU speed benchmark's harness on the CPU with tiny shapes (figures come from running it on a GPU, never from
tests): the shapes are the release model's, every arm runs and is checked to do what it is named after (its kernel
calls are counted), and the Triton arm's kernels give the torch arm's logits."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from tiny_models import ids, randomize, tiny_model

from deltamem_agents import DeltaMemConfig, attach
from deltamem_agents.benchmarks import speed_gpu
from deltamem_agents.benchmarks.speed_gpu import (
    ArmResult,
    build_model,
    format_table,
    ratios,
    run_gpu_speed_benchmark,
)
from deltamem_agents.cli import main as cli_main

HAS_TRITON = importlib.util.find_spec("triton") is not None
THEIRS = os.environ.get("DELTAMEM_THEIRS_SRC")  # an uncommitted declare-lab/delta-Mem checkout, if any


@pytest.fixture
def interpreter():
    """Triton kernels on the CPU run through the interpreter, which tests/conftest.py switches on before triton is
    first imported (the switch is read then)."""
    if not HAS_TRITON:
        pytest.skip('triton is not installed (pip install "deltamem-agents[cuda]")')


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_qwen3_4b_shapes_are_the_release_model():
    model = build_model("qwen3-4b", "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 4_022_468_096  # Qwen3-4B: 4.02 B with tied embeddings
    assert model.config._attn_implementation == "sdpa" and model.config.max_position_embeddings >= 32768 + 256
    assert attach(model, DeltaMemConfig()).num_trainable_parameters() == 4_866_336  # the paper's TSW count


def test_every_arm_runs_on_tiny_shapes(interpreter):
    arms = ("plain", "ours-torch", "ours-triton")
    results = run_gpu_speed_benchmark(device="cpu", dtype=torch.float32, shapes="tiny", prompts=(33, 70),
                                      decode_tokens=3, arms=arms, progress=False)
    assert sorted((r.prompt_tokens, r.arm) for r in results) == sorted((n, a) for n in (33, 70) for a in arms)
    layers = speed_gpu.SHAPES["tiny"]["num_hidden_layers"]
    for r in results:
        assert r.prefill_s > 0 and r.decode_s > 0 and r.peak_bytes is None  # no peak memory off CUDA
        if r.arm.startswith("ours"):
            assert r.checks["state_written"] and r.checks["state_dtype"] == "torch.float32"
        if r.arm == "ours-triton":  # one scan per layer for the prompt, one fused step per layer and token
            assert r.checks["kernel_calls"] == {"triton-scan": layers, "triton-decode": 3 * layers}
        if r.arm == "ours-torch":
            assert r.checks["kernel_calls"] == {"torch": 4 * layers}
    rows = ratios(results)
    assert all(row["prefill_ratio"] == 1.0 and row["decode_ratio"] == 1.0 for row in rows if row["arm"] == "plain")


@pytest.mark.skipif(THEIRS is None, reason="set DELTAMEM_THEIRS_SRC to a declare-lab/delta-Mem checkout")
def test_their_arm_uses_its_cache_and_writes_its_state():
    results = run_gpu_speed_benchmark(device="cpu", dtype=torch.float32, shapes="tiny", prompts=(40,),
                                      decode_tokens=3, arms=("plain", "theirs"), theirs=THEIRS, progress=False)
    theirs = next(r for r in results if r.arm == "theirs")
    assert theirs.checks["state_written"]


def test_triton_arm_gives_the_torch_arms_logits(interpreter):
    """The kernels the Triton arm forces (the layer's own switch) give the torch arm's logits and states over a
    prefill with padding and three decode steps."""
    model = tiny_model("qwen3", layers=2)
    dm = attach(model, DeltaMemConfig())
    randomize(dm)
    x = ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: those positions write nothing

    def run():
        from deltamem_agents.models.kv_cache import cache_kwargs, new_cache

        dm.reset_state(2)
        cache = new_cache(model.config)
        out = [dm(input_ids=x, attention_mask=mask, **cache_kwargs(dm, cache)).logits]
        m = mask
        for step in range(3):
            m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
            out.append(dm(input_ids=ids(2, 1, seed=step + 1), attention_mask=m, **cache_kwargs(dm, cache)).logits)
        return torch.cat(out, 1), [s.clone() for s in dm.state.memory]

    with torch.no_grad():
        with speed_gpu.kernel_preference(dm, "torch"):
            ref, ref_state = run()
        assert dm.kernel_calls() == {"torch": 8}
        with speed_gpu.kernel_preference(dm, "triton"):
            got, got_state = run()
    assert dm.kernel == "auto"  # restored
    assert dm.kernel_calls() == {"torch": 8, "triton-scan": 2, "triton-decode": 6}
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(got_state, ref_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_command_line_writes_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = cli_main(["bench", "speed", "--device", "cpu", "--shapes", "tiny", "--dtype", "float32", "--prompts", "20",
                   "--decode-tokens", "2", "--arms", "plain", "ours-torch", "--json", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["context"]["shapes"] == "tiny" and payload["context"]["device"] == "cpu"
    assert [r["arm"] for r in payload["results"]] == ["plain", "ours-torch"]
    assert "| 20 | ours-torch |" in capsys.readouterr().out


def test_ratios_and_table():
    rs = [ArmResult("plain", 100, 10, 0.5, 2.0, 1000), ArmResult("ours-torch", 100, 10, 0.625, 2.5, 1010)]
    rows = ratios(rs)
    assert rows[1]["prefill_ratio"] == pytest.approx(0.8) and rows[1]["decode_ratio"] == pytest.approx(0.8)
    assert rows[1]["peak_ratio"] == pytest.approx(1.01)
    assert "| 100 | ours-torch | 160.0 | 0.800 | 4.00 | 0.800 | 0.00 | 1.0100 |" in format_table(rs)


def test_bad_arms_are_refused():
    with pytest.raises(ValueError, match="unknown arms"):
        run_gpu_speed_benchmark(device="cpu", shapes="tiny", arms=("plain", "fast"))
    with pytest.raises(ValueError, match="plain arm"):
        run_gpu_speed_benchmark(device="cpu", shapes="tiny", arms=("ours-torch",))
    with pytest.raises(ValueError, match="--theirs"):
        run_gpu_speed_benchmark(device="cpu", shapes="tiny", arms=("plain", "theirs"))
