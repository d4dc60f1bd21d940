"""What a ``model=`` argument means: a name/path/GGUF to load, a loaded pair, or a δ-mem model object."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["display_name", "eos_token_ids", "resolve_model"]


def display_name(source: Any, model: nn.Module) -> str:
    """A name for users and API responses, never a cache path: the embedded model's name, a directory's or
    GGUF file's base name, a hub id as given, or the config's name."""
    from .embedded import EMBEDDED_MODEL

    if source is None:
        return EMBEDDED_MODEL.name
    if isinstance(source, str | os.PathLike):
        text = str(source)
        path = Path(text).expanduser()
        if path.exists():
            name = path.name
            return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
        return text  # a hub id
    cfg = getattr(model, "config", None)
    raw = str(getattr(cfg, "_name_or_path", "") or "")
    if raw:
        path = Path(raw)
        return path.name if path.is_absolute() or path.exists() else raw
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def resolve_model(model: Any, adapter: Any, tokenizer: Any, device: Any, dtype: Any) -> tuple[Any, Any, str]:
    """Turn the engine's ``model``/``adapter``/``tokenizer`` arguments into ``(DeltaMemModel, tokenizer, name)``.

    Raises:
        ValueError: a tuple that is not ``(model, tokenizer)``; no tokenizer; ``adapter=`` with a model that already
            is a ``DeltaMemModel``.
        TypeError: ``model`` of another type.
    """
    from ..adapter import DeltaMemModel, resolve_adapter

    source: Any = "object"
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError("model as a tuple must be (model, tokenizer)")
        model, tokenizer = model
    if model is None or isinstance(model, str | os.PathLike):
        from .loading import load_base_model

        source = model
        model, loaded_tok = load_base_model(model, device=device, dtype=dtype)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError("a tokenizer is needed: pass (model, tokenizer) or tokenizer=")
    if isinstance(model, DeltaMemModel):
        if adapter is not None:
            raise ValueError("model is already a DeltaMemModel; do not pass adapter=")
        return model, tokenizer, display_name(source, model.base_model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be None, a path/hub id, a model or (model, tokenizer), got {type(model).__name__}")
    return resolve_adapter(model, adapter), tokenizer, display_name(source, model)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (one or several) and the tokenizer's."""
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
