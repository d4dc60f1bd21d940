"""The KV cache across transformers versions: passed under the name the installed version takes, and checked."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from tiny_models import ARCHS, ids, randomize, tiny_model
from torch import nn

from deltamem_agents import DeltaMemConfig, attach
from deltamem_agents.models.kv_cache import (
    CacheNotUsedError,
    cache_argument,
    cache_kwargs,
    cache_layers,
    cache_length,
    cache_mark,
    cache_rewind,
    forward_with_cache,
    new_cache,
)


def _installed_name(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@pytest.mark.parametrize("arch", ARCHS)
def test_argument_name_is_the_one_the_installed_forward_declares(arch):
    model = tiny_model(arch)
    assert cache_argument(model) == _installed_name(model)
    # the δ-mem wrapper's forward takes **kwargs: the name comes from the wrapped model
    assert cache_argument(attach(model, DeltaMemConfig())) == _installed_name(model)
    assert cache_kwargs(model, None) == {"use_cache": False}


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_prefill_and_decode_equal_one_pass_without_deprecation_warnings(arch):
    dm = attach(tiny_model(arch), DeltaMemConfig())
    randomize(dm, scale=0.5)
    x = ids(1, 19)
    with torch.no_grad():
        dm.reset_state(1)
        full = dm(x).logits
        dm.reset_state(1)
        cache = new_cache(dm.base_model.config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a deprecated argument name would raise here
            parts = [forward_with_cache(dm, cache, x[:, :12]).logits]
            parts += [forward_with_cache(dm, cache, x[:, t : t + 1]).logits for t in range(12, 19)]
    assert cache_length(cache) == 19
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-4, rtol=1e-4)


class _DropsTheCache(nn.Module):
    """A model whose forward accepts a cache argument and ignores it: what a renamed argument looks like when
    the old name lands in ``**kwargs``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return self.inner(input_ids=input_ids, use_cache=False, **kwargs)


def test_a_call_that_ignores_its_cache_raises():
    inner = tiny_model("llama")
    model = _DropsTheCache(inner)
    cache = new_cache(inner.config)
    with torch.no_grad(), pytest.raises(CacheNotUsedError, match="did not use the cache"):
        forward_with_cache(model, cache, ids(1, 5))
    assert cache_length(cache) == 0


def test_a_model_without_any_cache_argument_is_a_clear_error():
    class NoCache(nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match="takes none of"):
        cache_argument(NoCache())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt", [5, 13])  # gemma3's window is 8: within it, and past it (nothing to crop back)
def test_rewind_to_a_mark_gives_back_exactly_the_cache_of_the_prompt(arch, prompt):
    """Generation runs past the mark and the cache is taken back to it: every layer (full ones cropped,
    sliding-window ones restored) holds exactly what a cache of the prompt alone holds, and continues like it."""
    model = tiny_model(arch)
    x = ids(1, prompt + 12)
    with torch.no_grad():
        cache = new_cache(model.config)
        forward_with_cache(model, cache, x[:, :prompt])
        mark = cache_mark(cache)
        for t in range(prompt, prompt + 12):  # "generated" tokens, one at a time, past any sliding window
            forward_with_cache(model, cache, x[:, t : t + 1])
        cache_rewind(cache, mark)
        alone = new_cache(model.config)
        forward_with_cache(model, alone, x[:, :prompt])
        assert cache_length(cache) == cache_length(alone) == prompt
        for (k, v), (k0, v0) in zip(cache_layers(cache), cache_layers(alone), strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        nxt = x[:, prompt + 3 : prompt + 6]  # and the rewound cache continues as the prompt's own cache does
        torch.testing.assert_close(forward_with_cache(model, cache, nxt).logits,
                                   forward_with_cache(model, alone, nxt).logits, atol=0, rtol=0)
    if arch == "gemma3" and prompt > 8:
        with pytest.raises(Exception, match="crop"):  # what the mark exists for: transformers refuses this
            forward_with_cache(model, alone, x[:, :2])
            alone.crop(-2)
