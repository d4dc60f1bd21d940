"""The inference fast path (compiled kernel, in-place steering, class-swap interception) against the
differentiable torch path, at model level: logits and final states."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, ids, randomize, tiny_model

from deltamem_agents import DeltaMemConfig, attach
from deltamem_agents.adapter import _cpu_kernel
from deltamem_agents.models.kv_cache import forward_with_cache, new_cache

pytestmark = pytest.mark.skipif(not _cpu_kernel.AVAILABLE, reason="numba not installed")


def _run(dm, tokens, mask, grad: bool):
    dm.reset_state(tokens.shape[0])
    with torch.set_grad_enabled(grad):
        logits = dm(tokens, attention_mask=mask).logits
    return logits.detach(), dm.get_state()


@pytest.mark.parametrize("mode", ["tsw", "msw"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_torch_path(arch, mode):
    dm = attach(tiny_model(arch), DeltaMemConfig(write_mode=mode, chunk_size=16))
    randomize(dm, scale=0.5)
    tokens = ids(2, 37)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :5] = 0  # left padding on row 1
    slow_logits, slow_state = _run(dm, tokens, mask, grad=True)
    fast_logits, fast_state = _run(dm, tokens, mask, grad=False)
    torch.testing.assert_close(fast_logits, slow_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(fast_state.memory, slow_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_fast_path_decode_matches_full_pass():
    dm = attach(tiny_model("llama"), DeltaMemConfig())
    randomize(dm, scale=0.5)
    tokens = ids(1, 21)
    full_logits, full_state = _run(dm, tokens, None, grad=False)
    dm.reset_state(1)
    with torch.no_grad():
        cache = new_cache(dm.base_model.config)
        steps = [forward_with_cache(dm, cache, tokens[:, :13]).logits]
        for t in range(13, 21):
            steps.append(forward_with_cache(dm, cache, tokens[:, t : t + 1]).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full_logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dm.get_state().memory[0], full_state.memory[0], atol=2e-5, rtol=1e-5)


def test_weight_cache_follows_parameter_updates():
    """The transposed weight copies of the fast path must never go stale (optimiser steps, load_state_dict)."""
    dm = attach(tiny_model("llama"), DeltaMemConfig())
    randomize(dm, scale=0.5)
    tokens = ids(1, 9)
    before, _ = _run(dm, tokens, None, grad=False)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.mul_(1.5)  # in place, as an optimiser does
    after_fast, _ = _run(dm, tokens, None, grad=False)
    after_slow, _ = _run(dm, tokens, None, grad=True)
    assert not torch.allclose(before, after_fast)
    torch.testing.assert_close(after_fast, after_slow, atol=2e-5, rtol=1e-5)


def test_interception_is_removed_cleanly():
    model = tiny_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    cls, keys = type(q_proj), set(model.state_dict())
    dm = attach(model, DeltaMemConfig())
    assert type(q_proj) is not cls and isinstance(q_proj, cls)
    assert set(model.state_dict()) == keys, "interception must not change the base model's state_dict keys"
    with dm.hooks_removed():
        assert type(q_proj) is cls
    assert type(q_proj) is not cls
    dm.detach_adapter()
    assert type(q_proj) is cls and "_deltamem_output_hook" not in q_proj.__dict__


@pytest.mark.parametrize("mode", ["tsw", "msw"])
def test_decode_kernel_equals_torch_step_path(mode):
    """Token-by-token decode on a batch of 2: compiled decode kernel (no grad) vs the torch step (grad on)."""
    dm = attach(tiny_model("qwen3"), DeltaMemConfig(write_mode=mode))
    randomize(dm, scale=0.5)
    tokens = ids(2, 9)

    def decode(grad: bool):
        dm.reset_state(2)
        logits, cache = [], new_cache(dm.base_model.config)
        with torch.set_grad_enabled(grad):
            for t in range(9):
                logits.append(forward_with_cache(dm, cache, tokens[:, t : t + 1]).logits.detach())
        return torch.cat(logits, 1), dm.get_state()

    fast_logits, fast_state = decode(False)
    slow_logits, slow_state = decode(True)
    torch.testing.assert_close(fast_logits, slow_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(fast_state.memory, slow_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_weight_copies_follow_a_parameter_replaced_by_none():
    """``training.gates.steering_disabled`` sets W_q^Δ and W_o^Δ to None for a block: the compiled path's weight
    copies must follow (no steering: the base model's logits exactly), and come back after."""
    from deltamem_agents.training.gates import steering_disabled

    model = tiny_model("llama")
    x = ids(1, 9)
    with torch.no_grad():
        base = model(x).logits
    dm = attach(model, DeltaMemConfig())
    dm.kernel = "auto"
    randomize(dm, scale=0.5)
    steered, _ = _run(dm, x, None, grad=False)
    with steering_disabled(dm):
        plain, state = _run(dm, x, None, grad=False)
    again, _ = _run(dm, x, None, grad=False)
    assert torch.equal(plain, base) and state.memory[0].abs().sum() > 0
    assert not torch.allclose(steered, base)
    torch.testing.assert_close(again, steered, atol=0, rtol=0)
    assert set(dm.kernel_calls()) == {"numba-scan"}
