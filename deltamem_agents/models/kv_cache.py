"""The KV cache across transformers versions: one place that knows how a cache is made, passed and checked.

transformers 5.x renamed the cache argument of every model's ``forward`` from ``past_key_values`` to ``cache``
(5.24 still accepts the old name with a ``FutureWarning``, and drops it in 5.40). The failure this module exists
to prevent is silent: a model's ``forward`` takes ``**kwargs``, so a cache passed under a name the installed
version does not know is swallowed, the call runs **without its cache** (attending only to the new tokens), and
nothing raises. So:

* :func:`cache_argument` reads the name from the model's own ``forward`` signature (cached per class), and
  :func:`cache_kwargs` passes the cache under it — no version sniffing, no deprecation warning;
* :func:`forward_with_cache` runs a call and checks that the cache grew by exactly the call's length, raising
  :class:`CacheNotUsedError` otherwise. Every cached forward of the library (engine, evaluation, benchmarks)
  goes through it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ..errors import DeltaMemError

if TYPE_CHECKING:  # torch is imported lazily: `deltamem sessions list` must not pay for it
    from torch import Tensor

__all__ = [
    "CacheMark",
    "CacheNotUsedError",
    "cache_argument",
    "cache_kwargs",
    "cache_layers",
    "cache_length",
    "cache_mark",
    "cache_rewind",
    "forward_with_cache",
    "new_cache",
    "output_cache",
]

#: The names the cache argument has had, newest first.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")

_BY_CLASS: dict[type, str] = {}


class CacheNotUsedError(DeltaMemError, RuntimeError):
    """A forward call was given a KV cache but did not extend it (the installed transformers ignored it)."""


def _signature_names(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def cache_argument(model: Any) -> str:
    """The keyword under which ``model``'s forward takes its KV cache (``"cache"`` or ``"past_key_values"``).

    ``model`` may be a Hugging Face causal LM or a wrapper whose ``forward`` takes ``**kwargs`` and exposes the
    wrapped model as ``base_model`` (a :class:`~deltamem_agents.adapter.DeltaMemModel`).
    """
    cls = type(model)
    name = _BY_CLASS.get(cls)
    if name is not None:
        return name
    names = _signature_names(cls.forward)
    found = next((n for n in CACHE_ARGUMENT_NAMES if n in names), None)
    if found is None:
        inner = getattr(model, "base_model", None)
        if inner is not None and inner is not model:
            return cache_argument(inner)
        raise TypeError(
            f"{cls.__name__}.forward takes none of {CACHE_ARGUMENT_NAMES}: cannot pass it a KV cache"
        )
    _BY_CLASS[cls] = found
    return found


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache, "use_cache": True}`` for ``model``'s forward, or ``{"use_cache": False}`` without one."""
    if cache is None:
        return {"use_cache": False}
    return {cache_argument(model): cache, "use_cache": True}


def new_cache(config: Any, layers: list[tuple[Tensor, Tensor]] | None = None) -> Any:
    """An empty ``DynamicCache`` for a model with this config, or one holding ``layers`` (per-layer k, v)."""
    from transformers import DynamicCache

    if layers is None:
        return DynamicCache(config=config)
    return DynamicCache(ddp_cache_data=layers, config=config)


def cache_length(cache: Any) -> int:
    """Tokens held by ``cache`` (0 when empty)."""
    return int(cache.get_seq_length())


def cache_layers(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """The per-layer ``(key, value)`` tensors of a ``DynamicCache`` (transformers ≥ 4.56 keeps them in layers)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # older layouts


class CacheMark:
    """A point to rewind a ``DynamicCache`` to (:func:`cache_mark`, :func:`cache_rewind`).

    Attributes:
        length: tokens the cache held.
        sliding: ``(layer index, keys, values, cumulative_length)`` of each sliding-window layer: the tensors
            ``(1, H_kv, min(length, window - 1), D)`` it held.
    """

    __slots__ = ("length", "sliding")

    def __init__(self, length: int, sliding: tuple[tuple[int, Tensor, Tensor, int], ...]) -> None:
        self.length = length
        self.sliding = sliding


def _sliding(layer: Any) -> bool:
    # A sliding-window layer that drops its oldest columns as it advances (``record_past`` layers keep them and
    # crop natively; transformers < 4.57 has no ``record_past``).
    return hasattr(layer, "sliding_window") and hasattr(layer, "cumulative_length") and not getattr(
        layer, "record_past", False)


def cache_mark(cache: Any) -> CacheMark:
    """Mark ``cache`` before tokens are appended to it that must be taken back later (a generation).

    Full-attention layers are rewound by cropping. Sliding-window layers (Gemma 3's local layers) cannot be: once
    a sequence is longer than the window they have dropped the columns that cropping would bring back, and
    transformers refuses. So the mark keeps a reference to the tensors they hold now. A ``DynamicCache`` update
    replaces a layer's tensors (``torch.cat``) rather than writing into them, so this copies nothing and costs
    at most ``window - 1`` columns per sliding layer while the generation runs.
    """
    layers = getattr(cache, "layers", None) or []
    sliding = tuple((i, layer.keys, layer.values, int(layer.cumulative_length))
                    for i, layer in enumerate(layers) if _sliding(layer) and layer.keys is not None)
    return CacheMark(cache_length(cache), sliding)


def cache_rewind(cache: Any, mark: CacheMark) -> None:
    """Take ``cache`` back to ``mark``: exactly the tensors it held then (the same objects for sliding-window
    layers, the first ``mark.length`` columns of full ones)."""
    extra = cache_length(cache) - mark.length
    if extra < 0:
        raise ValueError(f"the cache holds {cache_length(cache)} tokens, fewer than the mark's {mark.length}")
    if extra == 0:
        return
    layers = getattr(cache, "layers", None)
    if layers is None:
        cache.crop(-extra)  # older layouts: a negative argument removes that many tokens
        return
    marked = {i: (k, v, n) for i, k, v, n in mark.sliding}
    for i, layer in enumerate(layers):
        if i in marked:
            layer.keys, layer.values, layer.cumulative_length = marked[i]
        elif _sliding(layer):
            raise ValueError(f"layer {i} was not filled when the cache was marked")
        else:
            # A full layer: its first ``mark.length`` columns (what ``crop`` does; its argument changed meaning
            # across transformers versions, slicing did not).
            layer.keys, layer.values = layer.keys[:, :, : mark.length], layer.values[:, :, : mark.length]


def output_cache(output: Any) -> Any:
    """The cache a forward call returned (``output.cache`` or ``output.past_key_values``)."""
    for name in CACHE_ARGUMENT_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def forward_with_cache(model: Any, cache: Any, input_ids: Tensor, **kwargs: Any) -> Any:
    """``model(input_ids=input_ids, <cache>=cache, use_cache=True, **kwargs)``, checked.

    Args:
        model: a causal LM (or a δ-mem wrapper of one).
        cache: a ``DynamicCache`` the call must extend in place.
        input_ids: ``(B, T)`` token ids continuing ``cache``.
    Raises:
        CacheNotUsedError: the cache did not grow by ``T`` (the call ran without it).
    """
    before = cache_length(cache)
    out = model(input_ids=input_ids, **cache_kwargs(model, cache), **kwargs)
    after = cache_length(cache)
    if after != before + input_ids.shape[1]:
        raise CacheNotUsedError(
            f"the KV cache went from {before} to {after} tokens over a call of {input_ids.shape[1]}: the model "
            f"({type(model).__name__}) did not use the cache passed as {cache_argument(model)!r}. This "
            f"transformers version may have renamed the argument again; please report it."
        )
    return out
