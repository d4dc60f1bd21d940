"""`DecodeGroup`: sessions decoding together as rows of one left-padded KV cache (no threads here).

Continuous batching at the scale of this engine: a session *joins* the group after its own prefill and *leaves*
when its generation ends; a steady-state step costs one batched forward, and no cache is copied per step beyond
what the transformers ``DynamicCache`` itself does when it appends the new column.

Layout. Rows have different lengths ``n_i``. The group's cache holds ``L = max n_i`` columns; row ``i`` occupies
the last ``n_i`` of them, the first ``L - n_i`` are padding (zeros, masked out). Per step every row gets one new
column, so the layout stays "left-padded, contiguous"; there are never holes inside a row. The step passes

* ``attention_mask (B, L + 1)``: 0 on each row's padding columns (``None`` when no row is padded: then the step
  is the very call the row would run alone);
* ``position_ids (B, 1) = n_i``: RoPE sees each row's own sequence position, not its column.

Sliding-window layers (``DynamicSlidingWindowLayer``) keep only the last ``window - 1`` columns; a row's last
``min(n_i, window - 1)`` tokens are exactly those columns' right end, so the same padding mask and positions
serve them (the mask is indexed by column, and within a row column distance equals position distance).

Join: one new tensor per layer, every row copied right-aligned into it (older rows get more left padding when a
longer row joins). Leave: the row's columns are copied back into the session's own cache object, bitwise what
it held plus the generated tokens' KV; the remaining rows are selected and padding columns that no row needs any
more are cut. While in the group a session's own cache holds nothing (its tensors moved into the group), so the
group never doubles the memory of the caches it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..adapter import DeltaMemState
from ..models.kv_cache import cache_length

if TYPE_CHECKING:
    from .batching import ModelRunner

__all__ = ["DecodeGroup", "GroupRow", "cache_layout", "model_can_batch"]


@dataclass(eq=False)
class GroupRow:
    """One session in a group.

    Attributes:
        cache: the session's own ``DynamicCache`` (1 row): emptied while the row is in the group, refilled with
            the row's columns when it leaves.
        state: the 1-row state every position of the row reads.
        length: tokens the row holds (= the position of its next token).
        owner: whatever the caller associates with the row (the batcher's member).
    """

    cache: Any
    state: DeltaMemState
    length: int = 0
    owner: Any = None


def _filled(layer: Any) -> bool:
    """Whether a cache layer holds tensors (transformers < 4.57 has no ``is_initialized``: keys are ``None``
    until the first update there)."""
    keys = getattr(layer, "keys", None)
    return keys is not None and bool(getattr(layer, "is_initialized", True))


def _initialise(layer: Any, keys: Tensor, values: Tensor) -> None:
    """``lazy_initialization`` takes ``(keys, values)`` from transformers 4.57 on and ``(keys,)`` before."""
    import inspect

    if len(inspect.signature(layer.lazy_initialization).parameters) >= 2:
        layer.lazy_initialization(keys, values)
    else:
        layer.lazy_initialization(keys)


def _layer_kind(layer: Any) -> str | None:
    """``"full"``, ``"sliding"``, or ``None`` for a layer this module cannot merge (quantised, offloaded,
    linear-attention, recording its past, or not yet filled)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if not _filled(layer):
        return None
    if type(layer) is DynamicSlidingWindowLayer and not getattr(layer, "record_past", False):
        return "sliding"
    if type(layer) is DynamicLayer:
        return "full"
    return None


def model_can_batch(empty_cache: Any) -> bool:
    """Whether a model whose fresh cache is ``empty_cache`` (``ModelRunner.new_cache()``) can decode in a
    group: a plain ``DynamicCache`` whose every layer is a full or sliding-window attention layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(empty_cache, "layers", None)
    return (isinstance(empty_cache, DynamicCache) and not getattr(empty_cache, "offloading", False) and bool(layers)
            and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers))


def cache_layout(cache: Any) -> tuple[str, ...] | None:
    """The layer kinds of a 1-row cache a group can take (``None``: it cannot). Every full layer must hold the
    cache's length and every sliding layer must have seen it."""
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        return None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    n = cache_length(cache)
    kinds = []
    for layer in layers:
        kind = _layer_kind(layer)
        if kind is None or layer.keys.dim() != 4 or layer.keys.shape[0] != 1:
            return None
        held = layer.cumulative_length if kind == "sliding" else layer.keys.shape[2]
        if held != n:
            return None
        kinds.append(kind)
    return tuple(kinds) if n > 0 else None


def _held(layer: Any, kind: str, length: int) -> int:
    """Columns of a row of ``length`` tokens that a layer keeps."""
    return min(length, layer.sliding_window - 1) if kind == "sliding" else length


class DecodeGroup:
    """Rows decoding together (see the module docstring). Not thread-safe: one owner drives it.

    Args:
        runner: runs the batched forward (:meth:`~.batching.ModelRunner.forward_rows`) and makes empty caches.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.rows: list[GroupRow] = []
        self.width = 0  # L: columns of the merged cache
        self.cache: Any = None
        self.state: DeltaMemState | None = None
        self.kinds: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def pad(self, row: GroupRow) -> int:
        """Padding columns before the row's first token."""
        return self.width - row.length

    # -- joining --------------------------------------------------------------------------------------------
    def add(self, joining: Sequence[GroupRow]) -> None:
        """Merge the rows' caches into the group (their own caches are emptied). Raises ``ValueError`` for a
        cache the group cannot take (nothing changes then)."""
        if not joining:
            return
        for row in joining:
            kinds = cache_layout(row.cache)
            if kinds is None:
                raise ValueError("this KV cache cannot be batched (not a filled DynamicCache of full or "
                                 "sliding-window layers with one row)")
            if self.kinds is not None and kinds != self.kinds:
                raise ValueError(f"cache layout {kinds} differs from the group's {self.kinds}")
            if row.state.batch_size != 1:
                raise ValueError(f"a row's state must have one row, got {row.state.batch_size}")
            row.length = cache_length(row.cache)
        kinds = cache_layout(joining[0].cache)
        assert kinds is not None
        width = max(self.width, *(r.length for r in joining))
        merged = self.cache if self.cache is not None else self.runner.new_cache()
        if len(merged.layers) != len(kinds):
            raise ValueError(f"the model's cache has {len(merged.layers)} layers, the rows' {len(kinds)}")
        total = len(self.rows) + len(joining)
        for li, kind in enumerate(kinds):
            target = _held(joining[0].cache.layers[li], kind, width)
            sources: list[tuple[Tensor, Tensor]] = []
            if self.rows:
                sources.append((merged.layers[li].keys, merged.layers[li].values))
            sources.extend((r.cache.layers[li].keys, r.cache.layers[li].values) for r in joining)
            k0, v0 = sources[0]
            keys = k0.new_zeros((total, k0.shape[1], target, k0.shape[3]))
            values = v0.new_zeros((total, v0.shape[1], target, v0.shape[3]))
            b = 0
            for k, v in sources:  # right-aligned: padding goes left
                rows = k.shape[0]
                keys[b : b + rows, :, target - k.shape[2] :] = k
                values[b : b + rows, :, target - v.shape[2] :] = v
                b += rows
            layer = merged.layers[li]
            if not _filled(layer):
                _initialise(layer, keys, values)
            layer.keys, layer.values = keys, values
            if kind == "sliding":
                layer.cumulative_length = width
        for row in joining:
            _release(row.cache, kinds)
        states = ([self.state] if self.state is not None else []) + [r.state for r in joining]
        self.state = DeltaMemState.cat(states)
        self.cache, self.kinds, self.width = merged, kinds, width
        self.rows = self.rows + list(joining)

    # -- leaving --------------------------------------------------------------------------------------------
    def remove(self, leaving: Sequence[GroupRow], *, restore: bool = True) -> None:
        """Take rows out; with ``restore`` their columns go back into their own caches (exact copies)."""
        if not leaving:
            return
        gone = {id(r) for r in leaving}
        if restore:
            for i, row in enumerate(self.rows):
                if id(row) in gone:
                    self._restore(i, row)
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if not keep:
            self.clear()
            return
        assert self.kinds is not None and self.state is not None
        rows = [self.rows[i] for i in keep]
        width = max(r.length for r in rows)  # padding columns no remaining row needs are cut
        index = torch.tensor(keep, dtype=torch.long, device=self.cache.layers[0].keys.device)
        for layer, kind in zip(self.cache.layers, self.kinds, strict=True):
            keys, values = layer.keys, layer.values
            if len(keep) != len(self.rows):
                keys, values = keys.index_select(0, index), values.index_select(0, index)
            target = _held(layer, kind, width)
            layer.keys, layer.values = keys[:, :, keys.shape[2] - target :], values[:, :, values.shape[2] - target :]
            if kind == "sliding":
                layer.cumulative_length = width
        self.state = self.state.select(keep)
        self.rows, self.width = rows, width

    def _restore(self, i: int, row: GroupRow) -> None:
        assert self.kinds is not None
        for merged, own, kind in zip(self.cache.layers, row.cache.layers, self.kinds, strict=True):
            n = _held(merged, kind, row.length)
            own.keys = merged.keys[i : i + 1, :, merged.keys.shape[2] - n :].clone()
            own.values = merged.values[i : i + 1, :, merged.values.shape[2] - n :].clone()
            if kind == "sliding":
                own.cumulative_length = row.length

    def clear(self) -> None:
        """Drop every row without restoring anything (after a failed step: the caches are of no use)."""
        self.rows, self.width, self.cache, self.state, self.kinds = [], 0, None, None, None

    # -- stepping -------------------------------------------------------------------------------------------
    def masks(self) -> tuple[Tensor | None, Tensor]:
        """``attention_mask (B, L + 1)`` (``None`` when no row is padded) and ``position_ids (B, 1)`` of the
        next step."""
        device = self.cache.layers[0].keys.device
        lengths = torch.tensor([r.length for r in self.rows], dtype=torch.long, device=device)[:, None]
        if all(r.length == self.width for r in self.rows):
            return None, lengths
        columns = torch.arange(self.width + 1, device=device)[None, :]
        return (columns >= self.width - lengths).to(torch.long), lengths

    def step(self, tokens: Sequence[int]) -> Tensor:
        """Run one token per row (in row order) → ``logits (B, V)`` float32 of each row's next position."""
        if len(tokens) != len(self.rows) or not self.rows:
            raise ValueError(f"{len(tokens)} tokens for {len(self.rows)} rows")
        assert self.state is not None
        device = self.cache.layers[0].keys.device
        ids = torch.tensor(list(tokens), dtype=torch.long, device=device)[:, None]
        mask, positions = self.masks()
        logits = self.runner.forward_rows(self.state, ids, self.cache, attention_mask=mask, position_ids=positions)
        self.width += 1
        for row in self.rows:
            row.length += 1
        return logits


def _release(cache: Any, kinds: tuple[str, ...]) -> None:
    """Empty a row's own cache (its tensors now live in the group) so the group does not double the memory."""
    for layer, kind in zip(cache.layers, kinds, strict=True):
        layer.keys = layer.keys.new_empty((*layer.keys.shape[:2], 0, layer.keys.shape[3]))
        layer.values = layer.values.new_empty((*layer.values.shape[:2], 0, layer.values.shape[3]))
        if kind == "sliding":
            layer.cumulative_length = 0
