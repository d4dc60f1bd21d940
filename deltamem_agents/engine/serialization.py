"""`DeltaMemState` ⇄ store :class:`~deltamem_agents.store.base.TensorBlob` rows (raw little-endian bytes).

The store keeps bytes, dtype and shape; this module is the only place that turns them into tensors. An empty
blob list is the zero state (turn 0 of every session).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from ..adapter import DeltaMemModel, DeltaMemState
from ..store.base import CorruptStateError, TensorBlob
from .errors import InvalidStateError

__all__ = ["blobs_to_state", "check_state", "state_to_blobs"]

_TORCH_TO_NAME = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64", torch.int32: "int32"}
_NAME_TO_NUMPY = {"float32": "<f4", "float64": "<f8", "int64": "<i8", "int32": "<i4"}


def state_to_blobs(state: DeltaMemState) -> list[TensorBlob]:
    """One blob per tensor of :meth:`DeltaMemState.to_tensors` (``memory``: ``(L, 1, N, r, r)`` float32; SSW adds
    ``pending_sum``, ``pending_count``, ``last_segment``)."""
    blobs = []
    for name, tensor in state.to_tensors().items():
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _TORCH_TO_NAME:
            raise InvalidStateError(f"state tensor {name!r} has unsupported dtype {t.dtype}")
        array = t.numpy()
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            array = array.byteswap().view(array.dtype.newbyteorder())
        blobs.append(TensorBlob(name=name, dtype=_TORCH_TO_NAME[t.dtype], shape=tuple(t.shape), data=array.tobytes()))
    return blobs


def blobs_to_state(blobs: Sequence[TensorBlob], model: DeltaMemModel) -> DeltaMemState:
    """Rebuild a 1-row state for ``model`` (zero state for ``[]``) and check it fits the model and is finite.

    Raises :class:`CorruptStateError` for bytes that do not match dtype × shape, :class:`InvalidStateError` for a
    state of another layout or with NaN/Inf.
    """
    if not blobs:
        return model.new_state(1)
    tensors: dict[str, torch.Tensor] = {}
    for blob in blobs:
        np_dtype = _NAME_TO_NUMPY.get(blob.dtype)
        if np_dtype is None:
            raise CorruptStateError(f"state tensor {blob.name!r}: dtype {blob.dtype!r} is not a state dtype")
        try:
            array = np.frombuffer(blob.data, dtype=np_dtype).reshape(tuple(blob.shape))
        except ValueError as exc:
            raise CorruptStateError(f"state tensor {blob.name!r}: {exc}") from exc
        # copy(): frombuffer views immutable bytes; astype to the native byte order for torch
        tensors[blob.name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    try:
        state = DeltaMemState.from_tensors(tensors)
    except ValueError as exc:
        raise InvalidStateError(f"stored state has the wrong layout: {exc}") from exc
    check_state(state, model)
    return state


def check_state(state: DeltaMemState, model: DeltaMemModel) -> None:
    """Raise :class:`InvalidStateError` unless ``state`` is a finite 1-row state of ``model``'s layout."""
    if state.batch_size != 1:
        raise InvalidStateError(f"a session state has one row, this one has {state.batch_size}")
    try:
        model.check_state(state)  # layers, (N, r, r), write mode, finiteness
    except ValueError as exc:
        raise InvalidStateError(f"state does not fit this model: {exc}") from exc
