"""Saving and loading δ-mem adapters.

Our format (PEFT-like): a directory with ``adapter_config.json`` (the :class:`DeltaMemConfig`, the base model's
identity and fingerprint, the adapter's own fingerprint) and ``adapter_model.safetensors`` (adapter tensors only).

The authors' release format is read by :mod:`.official`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DeltaMemError
from ..files import atomic_write
from .config import DeltaMemConfig
from .model import DeltaMemModel, attach

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterMismatchError",
    "adapter_fingerprint",
    "base_model_fingerprint",
    "base_model_identity",
    "load_adapter",
    "read_adapter_metadata",
    "save_adapter",
    "tensors_fingerprint",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
#: Config options added after adapters were first saved, with their defaults: left out of the adapter fingerprint
#: while at the default, so adapters saved before they existed (and the sessions that recorded their
#: fingerprint) keep the fingerprint they had.
_LATER_OPTIONS = {"state_update_mode": "standard", "normalize_qk": True, "ssw_semantics": "ours"}


class AdapterMismatchError(DeltaMemError, ValueError):
    """The adapter was trained for another base model, or its files disagree with each other."""


# -- fingerprints ------------------------------------------------------------------------------------------------
_IDENTITY_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size",
)


def base_model_identity(model: nn.Module) -> dict[str, Any]:
    """The architecture facts that an adapter depends on (and the name it was loaded from)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    ident = {k: getattr(cfg, k, None) for k in _IDENTITY_KEYS}
    ident["name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return ident


def base_model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, shape and a strided sample of its values.

    Cheap (no full pass over the weights) yet different for fine-tunes that share an architecture: a sample of
    up to 4,096 evenly spaced values per tensor is hashed.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith("delta_layers."):
            continue
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def tensors_fingerprint(tensors: dict[str, Tensor], config: DeltaMemConfig) -> str:
    """SHA-256 of the adapter config and every adapter tensor's bytes (adapters are small)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _LATER_OPTIONS or v != _LATER_OPTIONS[k]}
    h = hashlib.sha256(json.dumps(fields, indent=2, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_fingerprint(model: DeltaMemModel) -> str:
    return tensors_fingerprint(model.adapter_state_dict(), model.config)


# -- our format --------------------------------------------------------------------------------------------------
def save_adapter(model: DeltaMemModel, directory: str | Path, **extra_metadata: Any) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter_state_dict().items()}
    meta = {
        "format": "deltamem-adapter",
        "format_version": FORMAT_VERSION,
        "deltamem_config": model.config.to_dict(),
        "layer_indices": list(model.layer_indices),
        "base_model": base_model_identity(model.base_model),
        "base_model_fingerprint": base_model_fingerprint(model.base_model),
        "adapter_fingerprint": tensors_fingerprint(tensors, model.config),
        **extra_metadata,
    }
    # Each file is replaced atomically; the config (written last) names the weights' fingerprint, so a crash
    # between the two leaves a pair that load_adapter refuses rather than a silently mixed adapter.
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def read_adapter_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    meta = json.loads(path.read_text())
    if meta.get("format") != "deltamem-adapter":
        raise AdapterMismatchError(f"{path} is not a δ-mem adapter config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterMismatchError(f"{path} has format version {meta['format_version']}; this library reads ≤ {FORMAT_VERSION}")
    return meta


def load_adapter(model: nn.Module, directory: str | Path, *, check_base: str = "error") -> DeltaMemModel:
    """Attach the adapter saved in ``directory`` to ``model`` (a plain HF causal LM).

    ``check_base``: ``"error"`` (default) refuses a base model whose architecture identity or fingerprint differs
    from the one the adapter was trained on; ``"warn"`` only logs; ``"ignore"`` skips the fingerprint check
    (the architecture must still match).
    """
    if check_base not in ("error", "warn", "ignore"):
        raise ValueError("check_base must be 'error', 'warn' or 'ignore'")
    directory = Path(directory)
    meta = read_adapter_metadata(directory)
    config = DeltaMemConfig.from_dict(meta["deltamem_config"])
    ident = base_model_identity(model)
    saved_ident = meta.get("base_model", {})
    diffs = [k for k in _IDENTITY_KEYS if saved_ident.get(k) is not None and saved_ident.get(k) != ident.get(k)]
    if diffs:
        raise AdapterMismatchError(
            "adapter was trained for another architecture: "
            + ", ".join(f"{k}={saved_ident[k]!r} (model has {ident.get(k)!r})" for k in diffs)
        )
    tensors = load_file(str(directory / WEIGHTS_NAME))
    if tensors_fingerprint(tensors, config) != meta.get("adapter_fingerprint"):  # checked before the model changes
        raise AdapterMismatchError(f"{directory / WEIGHTS_NAME} does not match the fingerprint in its config (corrupt or edited)")
    dm = attach(model, config)
    dm.load_adapter_state_dict(tensors)
    if check_base != "ignore" and meta.get("base_model_fingerprint") != base_model_fingerprint(model):
        msg = (
            f"adapter in {directory} was saved on base model {saved_ident.get('name_or_path')!r} whose weights "
            "differ from this model's (fingerprint mismatch)"
        )
        if check_base == "error":
            dm.detach_adapter()
            raise AdapterMismatchError(msg + "; pass check_base='warn' to load anyway")
        import logging

        logging.getLogger(__name__).warning(msg)
    return dm
