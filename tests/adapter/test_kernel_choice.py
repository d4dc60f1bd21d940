"""The layer's kernel choice (``adapter/kernel_choice.py``): what ``auto`` picks for each kind of call, what a forced
kernel refuses (with the reason), and — forcing Triton on the CPU through its interpreter — that the layer's Triton
branch (scan for prefill and training, fused step for decode) gives the torch path's logits, states and
gradients for every update rule, TSW/MSW/SSW, masks and odd lengths."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import ids, randomize, tiny_model

from deltamem_agents import DeltaMemConfig, attach
from deltamem_agents.adapter import _cpu_kernel
from deltamem_agents.adapter.kernel_choice import KERNELS, KernelUnavailableError, kernel_from_env
from deltamem_agents.models.kv_cache import forward_with_cache, new_cache

needs_numba = pytest.mark.skipif(not _cpu_kernel.AVAILABLE, reason="numba not installed")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                  reason="triton not installed (CPU runs use its interpreter; GPU runs: test_gpu)")

RULES = [
    {},
    {"update_rule": "delta"},
    {"update_rule": "decoupled"},
    {"state_update_mode": "lambda_outside"},
    {"state_update_mode": "lambda_outside", "update_rule": "decoupled"},
    {"normalize_qk": False},
]


def _dm(write_mode="tsw", arch="qwen3", kernel="auto", **opts):
    dm = attach(tiny_model(arch), DeltaMemConfig(write_mode=write_mode, chunk_size=4, **opts))
    randomize(dm, scale=0.5)
    if not dm.config.normalize_qk:  # raw keys: keep β‖k‖² well below 2, where the delta rule is stable
        with torch.no_grad():
            for layer in dm.delta_layers.values():
                layer.in_proj[: 2 * dm.config.state_width].mul_(0.1)
    dm.kernel = kernel
    return dm


def _calls(dm, fn, result=None):
    """The implementations ``fn()`` ran (calls per implementation); its result goes into ``result`` if given."""
    before = dm.kernel_calls()
    out = fn()
    if result is not None:
        result.append(out)
    return {k: n - before.get(k, 0) for k, n in dm.kernel_calls().items() if n != before.get(k, 0)}


def _prefill_decode(dm, x, mask=None, segment_ids=None, split=7):
    """Prefill ``x[:, :split]`` then decode the rest one token at a time: (logits, final state)."""
    dm.reset_state(x.shape[0])
    cache = new_cache(dm.base_model.config)
    seg = (lambda a, b: None) if segment_ids is None else (lambda a, b: segment_ids[:, a:b])
    kw = (lambda b: {}) if mask is None else (lambda b: {"attention_mask": mask[:, :b]})
    out = [forward_with_cache(dm, cache, x[:, :split], segment_ids=seg(0, split), **kw(split)).logits]
    for t in range(split, x.shape[1]):
        out.append(forward_with_cache(dm, cache, x[:, t : t + 1], segment_ids=seg(t, t + 1), **kw(t + 1)).logits)
    return torch.cat(out, 1), dm.get_state()


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# -- the choice ---------------------------------------------------------------------------------------------------
def test_kernel_preference_comes_from_the_environment(monkeypatch):
    for value in KERNELS:
        monkeypatch.setenv("DELTAMEM_KERNEL", value.upper())
        assert kernel_from_env() == value
        assert attach(tiny_model("llama"), DeltaMemConfig()).kernel == value
    monkeypatch.setenv("DELTAMEM_KERNEL", "cuda")
    with pytest.raises(ValueError, match="DELTAMEM_KERNEL must be one of"):
        attach(tiny_model("llama"), DeltaMemConfig())
    monkeypatch.delenv("DELTAMEM_KERNEL")
    dm = attach(tiny_model("llama"), DeltaMemConfig())
    assert dm.kernel == "auto"
    with pytest.raises(ValueError, match="kernel must be one of"):
        dm.kernel = "fast"
    dm.kernel = "torch"
    assert {layer.kernels.preference for layer in dm.delta_layers.values()} == {"torch"}


@needs_numba
def test_auto_on_the_cpu():
    dm = _dm()
    x = ids(2, 9)
    layers = len(dm.layer_indices)
    with torch.no_grad():
        assert _calls(dm, lambda: dm(x)) == {"numba-scan": layers}
        assert _calls(dm, lambda: _prefill_decode(dm, x, split=7)) == {"numba-scan": layers, "numba-decode": 2 * layers}
        with dm.writes_disabled():
            assert _calls(dm, lambda: dm(x)) == {"read": layers}
    assert _calls(dm, lambda: dm(x)) == {"torch": layers}  # grad mode on and trainable weights: torch
    assert dm.state.memory[0].requires_grad
    assert _calls(dm, lambda: dm(x)) == {"torch": layers}  # the state carries a graph: still torch
    for p in dm.parameters():
        p.requires_grad_(False)
    dm.reset_state(2)
    assert _calls(dm, lambda: dm(x)) == {"numba-scan": layers}  # nothing to differentiate
    dm64 = _dm()
    dm64.base_model.double()
    dm64.delta_layers.double()
    with torch.no_grad():
        assert _calls(dm64, lambda: dm64(x)) == {"torch": layers}  # float64: the torch paths
    for opts in ({"update_rule": "decoupled"}, {"write_mode": "ssw"}):
        other = _dm(**opts)
        with torch.no_grad():
            assert _calls(other, lambda o=other: o(x)) == {"torch": layers}


@needs_numba
@pytest.mark.parametrize(("opts", "grad", "match"), [
    ({}, True, "needs gradients"),
    ({"write_mode": "ssw"}, False, "sequence-state writes"),
    ({"update_rule": "decoupled"}, False, "decoupled"),
    ({"wide_value": True, "branches": ("o",)}, False, "wide values"),
])
def test_forced_numba_refuses_what_it_cannot_serve(opts, grad, match):
    dm = _dm(kernel="numba", arch="llama", **opts)
    with pytest.raises(KernelUnavailableError, match=match), torch.set_grad_enabled(grad):
        dm(ids(1, 5))


def test_forced_numba_refuses_float64():
    dm = _dm(kernel="numba", arch="llama")
    dm.base_model.double()
    dm.delta_layers.double()
    match = "float32" if _cpu_kernel.AVAILABLE else "numba is not installed"
    with pytest.raises(KernelUnavailableError, match=match), torch.no_grad():
        dm(ids(1, 5))


@needs_triton
def test_forced_triton_refuses_what_it_cannot_serve(monkeypatch):
    dm = _dm(kernel="triton", arch="llama", wide_value=True, branches=("o",))
    with pytest.raises(KernelUnavailableError, match="wide values"), torch.no_grad():
        dm(ids(1, 5))
    dm = _dm(kernel="triton", arch="llama")
    dm.base_model.double()
    dm.delta_layers.double()
    with pytest.raises(KernelUnavailableError, match="float64"), torch.no_grad():
        dm(ids(1, 5))
    from deltamem_agents.ops import triton_support

    dm = _dm(kernel="triton", arch="llama")
    monkeypatch.setattr(triton_support, "interpreting", lambda: False)  # a CPU without the interpreter
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"), torch.no_grad():
        dm(ids(1, 5))
    dm.kernel = "auto"  # auto never takes Triton on a CPU
    with torch.no_grad():
        assert "triton-scan" not in _calls(dm, lambda: dm(ids(1, 5)))


def test_torch_serves_every_call():
    dm = _dm(kernel="torch")
    with torch.no_grad():
        assert _calls(dm, lambda: _prefill_decode(dm, ids(1, 9))) == {"torch": 3 * len(dm.layer_indices)}


# -- the layer's Triton branch against its torch path (Triton's interpreter on the CPU) ---------------------------
@needs_triton
@pytest.mark.parametrize("opts", RULES, ids=str)
@pytest.mark.parametrize("mode", ["tsw", "msw"])
def test_triton_prefill_and_decode_equal_the_torch_path(opts, mode):
    dm = _dm(mode, **opts)
    x = ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding on row 1
    layers = len(dm.layer_indices)
    with torch.no_grad():
        dm.kernel = "torch"
        ref, ref_state = _prefill_decode(dm, x, mask)
        dm.kernel = "triton"
        run = []
        got_calls = _calls(dm, lambda: _prefill_decode(dm, x, mask), run)
        got, got_state = run[0]
    assert got_calls == {"triton-scan": layers, "triton-decode": 3 * layers}
    _close(got, ref, 1e-4)
    for a, b in zip(got_state.memory, ref_state.memory, strict=True):
        assert a.dtype == torch.float32
        _close(a, b)


@needs_triton
@pytest.mark.parametrize("opts", [{}, {"update_rule": "decoupled", "state_update_mode": "lambda_outside"}], ids=str)
def test_triton_training_gradients_equal_the_torch_path(opts):
    """Training: the Triton scan (prefill and one-token calls alike) is differentiable; the loss, the carried state
    and every adapter parameter's gradient match the torch path."""
    x = ids(2, 11)

    def loss_and_grads(kernel):
        dm = _dm(**opts, kernel=kernel)
        dm.reset_state(2)
        logits = dm(x[:, :8]).logits  # a write call, then a one-token call on the state it left
        logits2 = dm(x[:, 8:9]).logits
        loss = logits.pow(2).mean() + logits2.pow(2).mean() + dm.state.memory[0].pow(2).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in dm.named_parameters() if p.requires_grad}
        return loss.detach(), grads, dm

    ref_loss, ref_grads, _ = loss_and_grads("torch")
    loss, grads, dm = loss_and_grads("triton")
    assert dm.kernel_calls() == {"triton-scan": 2 * len(dm.layer_indices)}
    _close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].abs().max() > 0, name
        _close(grads[name], ref_grads[name], 1e-4)


@needs_triton
@pytest.mark.parametrize("semantics", ["ours", "official"])
def test_triton_sequence_state_writes_equal_the_torch_path(semantics):
    dm = _dm("ssw", ssw_semantics=semantics)
    x = ids(2, 12)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5]] * 2)
    with torch.no_grad():
        dm.kernel = "torch"
        ref, ref_state = _prefill_decode(dm, x, segment_ids=seg, split=9)
        dm.kernel = "triton"
        run = []
        calls = _calls(dm, lambda: _prefill_decode(dm, x, segment_ids=seg, split=9), run)
        got, got_state = run[0]
    assert set(calls) == {"triton-scan"}
    _close(got, ref, 1e-4)
    for a, b in zip(got_state.memory, ref_state.memory, strict=True):
        _close(a, b)
