"""`DeltaMemState`: the per-sequence memory of a δ-mem model (what a session persists).

The memory is kilobytes: for every wrapped layer a tensor of shape ``(B, N, r, r)`` (float32 whatever the model
dtype, so long conversations do not drift in bf16; float64 for a float64 model). Sequence-state write (SSW, our
semantics) additionally keeps, per layer, the running sum of the memory projections of the message that is still
open, and per row its token count and id: a message is written once, when the next message starts, so a message
split across calls still gets one write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NO_SEGMENT", "DeltaMemState"]

NO_SEGMENT = -1


@dataclass
class DeltaMemState:
    """Memory state of a batch of sequences.

    Attributes:
        memory: one tensor per wrapped layer, shape ``(B, N, r, r)``, float32 (or float64).
        pending_sum: SSW only; per layer ``(B, 4·N·r)``, sum of the memory projections of the open message.
        pending_count: SSW only; ``(B,)`` float32, number of tokens in the open message.
        last_segment: SSW only; ``(B,)`` int64, id of the open message (``-1``: none).
    """

    memory: list[Tensor]
    pending_sum: list[Tensor] | None = None
    pending_count: Tensor | None = None
    last_segment: Tensor | None = None

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def zeros(
        cls,
        num_layers: int,
        batch_size: int,
        num_states: int,
        rank: int,
        *,
        value_width: int | None = None,
        sequence_write: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> DeltaMemState:
        """A fresh state: ``S₀ = 0`` (gives exactly the base model's logits). ``value_width``: rows of each
        sub-state (``rank`` when None, as in the paper; the hidden size for wide values). ``dtype``: float32
        (default) or float64 (the memory arithmetic runs in the state's dtype)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"a state is float32 or float64, got {dtype}")
        rows = rank if value_width is None else value_width
        mem = [torch.zeros(batch_size, num_states, rows, rank, device=device, dtype=dtype) for _ in range(num_layers)]
        if not sequence_write:
            return cls(mem)
        width = 4 * num_states * rank
        return cls(
            mem,
            pending_sum=[torch.zeros(batch_size, width, device=device, dtype=dtype) for _ in range(num_layers)],
            pending_count=torch.zeros(batch_size, device=device, dtype=torch.float32),  # a count: never float64
            last_segment=torch.full((batch_size,), NO_SEGMENT, dtype=torch.long, device=device),
        )

    # -- shape ------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.memory[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.memory)

    @property
    def sequence_write(self) -> bool:
        return self.pending_sum is not None

    @property
    def device(self) -> torch.device:
        return self.memory[0].device

    # -- functional transforms (never modify self) -------------------------------------------------------------
    def _map(self, fn) -> DeltaMemState:
        return DeltaMemState(
            [fn(m) for m in self.memory],
            None if self.pending_sum is None else [fn(p) for p in self.pending_sum],
            None if self.pending_count is None else fn(self.pending_count),
            None if self.last_segment is None else fn(self.last_segment),
        )

    def clone(self) -> DeltaMemState:
        return self._map(lambda t: t.clone())

    def detach(self) -> DeltaMemState:
        """A copy cut from the autograd graph (what you keep between training steps or turns)."""
        return self._map(lambda t: t.detach().clone())

    def to(self, device: torch.device | str) -> DeltaMemState:
        return self._map(lambda t: t.to(device))

    def select(self, rows: int | Sequence[int] | Tensor) -> DeltaMemState:
        """The state of some batch rows (a 1-row state for an int)."""
        idx = _row_index(rows, self.device)
        return self._map(lambda t: t.index_select(0, idx))

    @staticmethod
    def cat(states: Sequence[DeltaMemState]) -> DeltaMemState:
        """Stack states along the batch (for batching sessions together)."""
        if not states:
            raise ValueError("cat() needs at least one state")
        first = states[0]
        for s in states[1:]:
            if s.num_layers != first.num_layers or s.sequence_write != first.sequence_write:
                raise ValueError("cannot concatenate states of different layouts")
            if s.memory[0].shape[1:] != first.memory[0].shape[1:]:
                raise ValueError("cannot concatenate states of different (N, r)")
        mem = [torch.cat([s.memory[i] for s in states]) for i in range(first.num_layers)]
        if not first.sequence_write:
            return DeltaMemState(mem)
        return DeltaMemState(
            mem,
            [torch.cat([s.pending_sum[i] for s in states]) for i in range(first.num_layers)],
            torch.cat([s.pending_count for s in states]),
            torch.cat([s.last_segment for s in states]),
        )

    def with_rows(self, rows: int | Sequence[int] | Tensor, other: DeltaMemState) -> DeltaMemState:
        """A copy of this state whose ``rows`` are replaced by the rows of ``other``."""
        idx = _row_index(rows, self.device)
        if other.batch_size != idx.numel():
            raise ValueError(f"{idx.numel()} rows given but the state has batch size {other.batch_size}")
        if other.num_layers != self.num_layers or other.sequence_write != self.sequence_write:
            raise ValueError("cannot set rows from a state of a different layout")

        def put(dst: Tensor, src: Tensor) -> Tensor:
            return dst.index_copy(0, idx, src.to(dst.device, dst.dtype))

        return DeltaMemState(
            [put(d, s) for d, s in zip(self.memory, other.memory, strict=True)],
            None
            if self.pending_sum is None
            else [put(d, s) for d, s in zip(self.pending_sum, other.pending_sum, strict=True)],
            None if self.pending_count is None else put(self.pending_count, other.pending_count),
            None if self.last_segment is None else put(self.last_segment, other.last_segment),
        )

    # -- checks and serialisation -------------------------------------------------------------------------------
    def is_finite(self) -> bool:
        """Whether the memory (and SSW's pending sums) hold no NaN or Inf: one reduction over every tensor and
        one read of its result on the host — on a GPU one sync per call (it was one per tensor), so it belongs
        where a state comes from outside, not in a per-token loop (:meth:`DeltaMemModel.set_state` skips it for
        the model's own states)."""
        tensors = [*self.memory, *(self.pending_sum or [])]
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        return bool(torch.isfinite(flat).all())

    def version_key(self) -> tuple | None:
        """The identity and autograd version counter of every tensor of the state: equal as long as no tensor was
        replaced or changed in place. Metadata only (no values read, no host sync). None when a tensor keeps no
        version counter (made under ``torch.inference_mode``): then nothing can tell an in-place change."""
        try:
            return tuple([(id(t), t._version) for t in self._tensors()])
        except RuntimeError:  # inference tensors do not track versions
            return None

    def _tensors(self) -> list[Tensor]:
        out = [*self.memory, *(self.pending_sum or [])]
        if self.pending_count is not None:
            out += [self.pending_count, self.last_segment]
        return out

    def equal(self, other: DeltaMemState) -> bool:
        """Bitwise equality (same layout and the same values)."""
        a, b = self.to_tensors(), other.to_tensors()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat, contiguous tensors for safetensors: ``memory`` is ``(L, B, N, r, r)``."""
        out = {"memory": torch.stack([m.detach() for m in self.memory]).contiguous()}
        if self.sequence_write:
            out["pending_sum"] = torch.stack([p.detach() for p in self.pending_sum]).contiguous()
            out["pending_count"] = self.pending_count.detach().contiguous()
            out["last_segment"] = self.last_segment.detach().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> DeltaMemState:
        if "memory" not in tensors:
            raise ValueError("state tensors lack 'memory'")
        memory = tensors["memory"]
        if memory.dim() != 5:
            raise ValueError(f"'memory' must have shape (L, B, N, r, r) (or (L, B, N, d, r)), got {tuple(memory.shape)}")
        mem = [_state_float(m) for m in memory.unbind(0)]
        keys = {"pending_sum", "pending_count", "last_segment"}
        present = keys & tensors.keys()
        if not present:
            return cls(mem)
        if present != keys:
            raise ValueError(f"sequence-write state is incomplete: has {sorted(present)}, needs {sorted(keys)}")
        ps = tensors["pending_sum"]
        L, B = memory.shape[:2]
        if ps.shape[:2] != (L, B) or tensors["pending_count"].shape != (B,) or tensors["last_segment"].shape != (B,):
            raise ValueError("sequence-write tensors do not match the memory's (layers, batch)")
        return cls(
            mem,
            [_state_float(p) for p in ps.unbind(0)],
            tensors["pending_count"].clone().float(),
            tensors["last_segment"].clone().long(),
        )


def _state_float(t: Tensor) -> Tensor:
    """A copy in float32, or float64 if it is (a float64 model's state keeps its precision)."""
    return t.clone() if t.dtype == torch.float64 else t.clone().float()


def _row_index(rows: int | Sequence[int] | Tensor, device: torch.device) -> Tensor:
    if isinstance(rows, int):
        rows = [rows]
    return torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
