"""Architecture table: where δ-mem finds the attention projections of each supported model family.

δ-mem never copies model code: it hooks the existing ``q_proj`` and ``o_proj`` linear layers of each decoder
layer's attention module. Correcting the *output* of ``q_proj`` places the correction before any per-head
``q_norm`` (Qwen3, Gemma 3) and before RoPE, as the paper prescribes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..errors import DeltaMemError

__all__ = [
    "ARCHITECTURES",
    "GENERIC_LAYERS_PATHS",
    "ArchitectureSpec",
    "UnsupportedArchitectureError",
    "resolve_architecture",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to reach the pieces δ-mem needs inside one model family.

    Attributes:
        name: family name shown in messages.
        layers_paths: dotted paths (from the causal-LM root) tried in order to find the decoder ``ModuleList``.
        attention: attribute of a decoder layer holding the attention module.
        q_proj / o_proj / v_proj: attribute names of the query, output and value projections of the attention.
        notes: what is special about the family (for the docs and error messages).
    """

    name: str
    layers_paths: tuple[str, ...] = ("model.layers",)
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    o_proj: str = "o_proj"
    v_proj: str = "v_proj"  # only the wide-value option decodes through it
    notes: str = ""


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("Llama / SmolLM2", notes="plain q_proj → RoPE"),
    "smollm3": ArchitectureSpec("SmolLM3", notes="Llama-like; some layers without RoPE (NoPE)"),
    "qwen3": ArchitectureSpec("Qwen3", notes="correction applied before the per-head q_norm"),
    "qwen2": ArchitectureSpec("Qwen2", notes="q_proj has a bias; correction added after it"),
    "mistral": ArchitectureSpec("Mistral"),
    "gemma3_text": ArchitectureSpec("Gemma 3 (text)", notes="correction applied before the per-head q_norm"),
    "gemma3": ArchitectureSpec(
        "Gemma 3 (multimodal)",
        layers_paths=("model.language_model.layers", "language_model.model.layers"),
        notes="only the language model's layers are wrapped",
    ),
}

GENERIC_LAYERS_PATHS = ("model.layers", "model.language_model.layers", "model.decoder.layers", "transformer.h")


class UnsupportedArchitectureError(DeltaMemError, ValueError):
    """The model has no attention layout δ-mem knows how to hook."""


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _has_linear(module: nn.Module | None, name: str) -> bool:
    return module is not None and isinstance(getattr(module, name, None), nn.Linear)


def resolve_architecture(model: nn.Module) -> tuple[ArchitectureSpec, nn.ModuleList]:
    """Find the architecture spec and the decoder-layer list of ``model``.

    Known ``model_type`` values use the table; any other model is accepted when its decoder layers expose
    ``self_attn.q_proj`` and ``self_attn.o_proj`` as ``nn.Linear`` (with a log line saying so). Otherwise an
    :class:`UnsupportedArchitectureError` names what is missing.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    generic = spec is None
    if generic:
        spec = ArchitectureSpec(f"generic ({model_type})", layers_paths=GENERIC_LAYERS_PATHS)

    layers = None
    for path in spec.layers_paths:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            layers = found
            break
    if layers is None:
        raise UnsupportedArchitectureError(
            f"cannot attach δ-mem to model_type {model_type!r}: no decoder layer list found at "
            f"{', '.join(spec.layers_paths)}. Known architectures: {', '.join(sorted(ARCHITECTURES))}."
        )
    missing = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, spec.attention, None)
        if attn is None:
            missing.append(f"layer {i}: attribute `{spec.attention}`")
            continue
        for proj in (spec.q_proj, spec.o_proj):
            if not _has_linear(attn, proj):
                missing.append(f"layer {i}: `{spec.attention}.{proj}` as nn.Linear")
    if missing:
        shown = "; ".join(missing[:4]) + (f"; … ({len(missing)} in all)" if len(missing) > 4 else "")
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"cannot attach δ-mem to model_type {model_type!r}: missing {shown}. "
            f"δ-mem needs attention modules with `q_proj` and `o_proj` linear layers. Known architectures: {known}."
        )
    if generic:
        logger.info("model_type %r is not in the architecture table; using the generic q_proj/o_proj layout", model_type)
    return spec, layers
