"""No host syncs in δ-mem's decode step (the CUDA checklist), shown on the CPU: a dispatch mode counts the operators
that read a tensor's value on the host or have a data-dependent output size — on a GPU each is a device sync —
during a forward call with δ-mem and during the same call of the plain model; δ-mem must add none.

The paths counted are the ones a GPU takes (torch, and Triton through its interpreter); the compiled CPU kernel
reads numpy views of CPU tensors and never runs on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import ids, randomize, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from deltamem_agents import DeltaMemConfig, DeltaMemState, attach
from deltamem_agents.adapter import segments
from deltamem_agents.models.kv_cache import cache_kwargs, new_cache

aten = torch.ops.aten
#: operators that wait for the device: a value read on the host, or an output whose size depends on the data
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default, aten.masked_select.default, aten.repeat_interleave.Tensor}
KERNELS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") and not torch.cuda.is_available() else [])


class CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _syncs(fn) -> list[str]:
    with CountSyncs() as counter:
        fn()
    return counter.ops


def _decode_syncs(dm, **call):
    """Syncs of one decode step with δ-mem, and of the same step of the plain model (same cache length)."""
    model = dm.base_model
    x = ids(2, 6)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as generate() passes it
    with torch.no_grad():
        dm.reset_state(2)
        cache = new_cache(model.config)
        dm(input_ids=x, attention_mask=mask[:, :6], **cache_kwargs(dm, cache), **call)
        plain_cache = new_cache(model.config)
        with dm.hooks_removed():
            model(input_ids=x, attention_mask=mask[:, :6], **cache_kwargs(model, plain_cache))
        step = ids(2, 1, seed=3)
        ours = _syncs(lambda: dm(input_ids=step, attention_mask=mask, **cache_kwargs(dm, cache), **call))
        with dm.hooks_removed():
            plain = _syncs(lambda: model(input_ids=step, attention_mask=mask, **cache_kwargs(model, plain_cache)))
    return ours, plain


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["tsw", "msw"])
def test_decode_step_adds_no_host_sync(mode, kernel):
    dm = attach(tiny_model("qwen3"), DeltaMemConfig(write_mode=mode))
    randomize(dm, scale=0.5)
    dm.kernel = kernel
    before = dm.kernel_calls()
    ours, plain = _decode_syncs(dm)
    assert sorted(ours) == sorted(plain)
    assert dm.kernel_calls() != before  # δ-mem ran


def test_sequence_state_decode_adds_no_host_sync_off_the_cpu(monkeypatch):
    """SSW (our semantics) plans its writes without reading values on the host where that would sync (static
    bound on the message slots, scatter instead of nonzero, ids validated only on the CPU): shown by making the
    planner treat the CPU as a device. Same logits as the exact plan made on the CPU."""
    dm = attach(tiny_model("qwen3"), DeltaMemConfig(write_mode="ssw", chunk_size=4))
    randomize(dm, scale=0.5)
    dm.kernel = "torch"
    x = ids(2, 9)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3]] * 2)

    def run():
        dm.reset_state(2)
        cache = new_cache(dm.base_model.config)
        with torch.no_grad():
            out = [dm(input_ids=x[:, :8], segment_ids=seg[:, :8], **cache_kwargs(dm, cache)).logits]
            syncs = _syncs(lambda: out.append(
                dm(input_ids=x[:, 8:], segment_ids=seg[:, 8:], **cache_kwargs(dm, cache)).logits))
        return torch.cat(out, 1), dm.get_state(), syncs

    host_logits, host_state, host_syncs = run()
    assert host_syncs  # on the CPU the plan reads values on the host (free there)
    monkeypatch.setattr(segments, "_host_reads_are_free", lambda device: False)
    logits, state, syncs = run()
    with torch.no_grad(), dm.hooks_removed():
        plain = _syncs(lambda: dm.base_model(input_ids=x))
    assert sorted(syncs) == sorted(plain)
    torch.testing.assert_close(logits, host_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(state.memory, host_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_installing_the_models_own_state_reads_nothing_on_the_host():
    """The engine installs, before every decode step, the state the model produced in the previous one: no
    finiteness check (a host sync) for it. A state from elsewhere is checked with one reduction (one sync for all
    layers), and a model-made state changed in place is checked again."""
    dm = attach(tiny_model("qwen3", layers=3), DeltaMemConfig())
    randomize(dm)
    with torch.no_grad():
        dm.reset_state(1)
        dm(ids(1, 5))
        own = dm.state
        assert _syncs(lambda: dm.set_state(own)) == []
        dm(ids(1, 1))
        assert _syncs(lambda: dm.set_state(dm.get_state())) == []
        foreign = DeltaMemState.from_tensors(dm.get_state().to_tensors())
        assert _syncs(lambda: dm.set_state(foreign)) == ["aten._local_scalar_dense.default"]
        changed = dm.get_state()
        changed.memory[1].mul_(2.0)  # in place: the seal breaks
        assert _syncs(lambda: dm.set_state(changed)) == ["aten._local_scalar_dense.default"]
        changed.memory[1][0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            dm.set_state(changed)
        other = attach(tiny_model("qwen3", layers=3), DeltaMemConfig())
        with pytest.raises(ValueError, match="NaN"):  # another model's seal counts for nothing
            other.set_state(dm._seal(changed))
