"""Which adapter a model gets: the shipped one, a directory (ours or the authors' format), or a fresh one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import DeltaMemConfig
from .io import AdapterMismatchError, load_adapter
from .model import DeltaMemModel, attach
from .official import import_official_adapter

__all__ = ["fresh_adapter", "resolve_adapter"]

logger = logging.getLogger(__name__)


def fresh_adapter(model: nn.Module) -> DeltaMemModel:
    """An untrained adapter on ``model``, seeded so it has the same weights (and fingerprint) in every process:
    sessions written with ``adapter="none"`` stay loadable after a restart."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return attach(model, DeltaMemConfig())


def resolve_adapter(model: nn.Module, adapter: str | os.PathLike[str] | None) -> DeltaMemModel:
    """Attach ``adapter`` to ``model``.

    Args:
        adapter: ``None`` (the shipped default adapter when it fits the model; otherwise a fresh one, with a
            warning), ``"none"`` (a fresh, untrained adapter), or a directory holding ``adapter_config.json``
            (our format) or ``delta_mem_config.json`` (the authors' format).
    Raises:
        FileNotFoundError: a directory without an adapter.
    """
    if adapter is not None and str(adapter).lower() == "none":
        return fresh_adapter(model)
    if adapter is None:
        from .shipped import shipped_adapter_dir

        shipped = shipped_adapter_dir()
        if shipped is None:
            logger.warning("no trained δ-mem adapter is installed; using a fresh, untrained adapter "
                           "(the state is written but carries little until an adapter is trained)")
            return fresh_adapter(model)
        try:
            return load_adapter(model, shipped)
        except AdapterMismatchError as exc:
            logger.warning("the shipped adapter does not fit this model (%s); using a fresh, untrained adapter", exc)
            return fresh_adapter(model)
    path = Path(adapter).expanduser()
    if (path / "adapter_config.json").is_file():
        return load_adapter(model, path)
    if (path / "delta_mem_config.json").is_file():
        return import_official_adapter(model, path)
    raise FileNotFoundError(f"no δ-mem adapter in {path} (expected adapter_config.json or delta_mem_config.json)")
