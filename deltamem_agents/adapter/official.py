"""The authors' release format (declare-lab/delta-Mem @ 5cd5d91): what their ``save_delta_mem_adapter`` writes.

A directory with

* ``delta_mem_config.json``: their ``HFDeltaMemConfig`` (48 fields). Every field is read: the ones that shape the
  computation are honoured (mapped onto :class:`DeltaMemConfig`), the initialisation-only and unused ones are
  type-checked, and any value this library does not implement is refused with
  :class:`UnsupportedOfficialConfigError` naming the field and the value. A field missing from the file takes
  their default at that commit (so a missing ``delta_heads`` means q, k, v, o — refused); an unknown field is
  refused.
* ``delta_mem_adapter.pt``: a ``torch.save`` of a flat state dict, read with ``torch.load(weights_only=True)``
  (no arbitrary pickled objects), keys ``model.layers.{i}.self_attn.{name}`` with ``name`` in ``memory_q_proj,
  memory_k_proj, memory_v_proj (N·r, d)``, ``beta_proj (N·r, d)``, ``beta_bias (N·r,)``, ``delta_{q,k,v,o}_proj
  (out, N·r)`` and, with ``couple_lambda=false``, ``lambda_proj (N·r, d)``, ``lambda_bias (N·r,)``. Their saver
  writes every ``delta_*_proj``, active or not: an inactive one is accepted only when it is all zeros
  (:class:`OfficialTensorError` names it otherwise). Their code writes no safetensors file; a
  ``delta_mem_adapter.safetensors`` with the same keys (a conversion) is read as well.

Tensors map onto our fused layout: ``in_proj = cat(memory_q, memory_k, memory_v, beta_proj)``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .architectures import resolve_architecture
from .config import DeltaMemConfig
from .io import AdapterMismatchError
from .model import DeltaMemModel, attach

__all__ = [
    "OFFICIAL_COMMIT",
    "OFFICIAL_CONFIG_NAME",
    "OFFICIAL_SAFETENSORS_NAME",
    "OFFICIAL_WEIGHTS_NAME",
    "OfficialTensorError",
    "UnsupportedOfficialConfigError",
    "config_from_official",
    "import_official_adapter",
]

OFFICIAL_COMMIT = "5cd5d9153c7f408764728d953565201e198c39e2"
OFFICIAL_CONFIG_NAME = "delta_mem_config.json"
OFFICIAL_WEIGHTS_NAME = "delta_mem_adapter.pt"
OFFICIAL_SAFETENSORS_NAME = "delta_mem_adapter.safetensors"


class UnsupportedOfficialConfigError(AdapterMismatchError):
    """A field of ``delta_mem_config.json`` has a value this library does not implement (or no such field)."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"delta_mem_config.json: {field}={value!r} is not supported: {why}")
        self.field = field
        self.value = value


class OfficialTensorError(AdapterMismatchError):
    """A tensor of ``delta_mem_adapter.pt`` is unexpected, missing, misshapen, or an inactive one is nonzero."""

    def __init__(self, tensor: str, why: str) -> None:
        super().__init__(f"{tensor}: {why}")
        self.tensor = tensor


# -- the config ----------------------------------------------------------------------------------------------------
#: ``HFDeltaMemConfig`` defaults at OFFICIAL_COMMIT (deltamem/core/delta_impl.py).
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "rank": 8, "alpha": 16.0, "beta_bias_init": -1.5, "normalize_qk": True, "couple_lambda": True,
    "state_update_mode": "standard", "rankwise_gates": True, "output_init": "zero", "base_slice_ref_width": 8,
    "online_gain": 0.05, "num_state_heads": 1, "num_memory_partitions": 1, "num_global_memory_partitions": 0,
    "memory_partition_routing": "soft", "memory_partition_basis": "shared",
    "tie_memory_partition_read_write": False, "memory_partition_read_mode": "softmax",
    "memory_partition_sigmoid_gate_bias_init": -2.0, "slot_read_top_k": 0, "global_memory_mode": "shared_rw",
    "global_memory_read_top_k": 0, "global_memory_merge_mode": "gated_residual",
    "global_memory_gate_bias_init": -2.0, "global_memory_read_logit_bias": 0.0, "memory_reader_layers": [],
    "memory_reader_hidden_size": 1024, "memory_reader_residual_scale": 0.1, "memory_reader_read_only": True,
    "memory_readout_mode": "delta", "memory_write_source": "learned_hidden", "memory_write_granularity": "token",
    "memory_write_proposals_per_message": 2, "synthetic_memory_slots": 1, "latent_memory_layers": [],
    "latent_memory_hidden_size": 1024, "latent_memory_residual_scale": 0.1, "latent_memory_slots": 4,
    "latent_memory_init_std": 0.002, "latent_gate_init": 0.01, "target_modules": ["self_attn"],
    "target_layers": [], "delta_heads": ["q", "k", "v", "o"], "delta_o_rmsnorm": False,
    "delta_o_rmsnorm_eps": 1e-6, "trainable_delta_scale": False, "delta_scale_init": 1.0, "delta_scale_max": 2.0,
    "delta_scale_granularity": "layer", "delta_scale_parameterization": "alpha_over_rank",
}

#: Archived features of their code: their mainline accepts only this value (and so do we).
_ARCHIVED = {
    "num_memory_partitions": 1, "num_global_memory_partitions": 0, "memory_partition_routing": "soft",
    "memory_partition_basis": "shared", "tie_memory_partition_read_write": False,
    "memory_partition_read_mode": "softmax", "slot_read_top_k": 0, "global_memory_mode": "shared_rw",
    "global_memory_read_top_k": 0, "global_memory_merge_mode": "gated_residual", "memory_reader_layers": [],
    "memory_readout_mode": "delta", "memory_write_source": "learned_hidden",
    "memory_write_proposals_per_message": 2, "synthetic_memory_slots": 1, "latent_memory_layers": [],
}
#: Options of their code this library does not implement: only the value that leaves them off is accepted.
_NOT_IMPLEMENTED = {
    "rankwise_gates": (True, "one write gate per sub-state instead of per state row"),
    "delta_o_rmsnorm": (False, "an RMSNorm on the output correction"),
    "trainable_delta_scale": (False, "a learned scale of the corrections"),
}
#: Initialisation only (a loaded adapter's weights replace what they set): read and type-checked.
_INIT_ONLY = {"beta_bias_init": "number", "output_init": "str", "base_slice_ref_width": "int", "online_gain": "number"}
#: Unused given the values above (archived features off, no trainable scale, no output norm): type-checked.
_INERT = {
    "memory_partition_sigmoid_gate_bias_init": "number", "global_memory_gate_bias_init": "number",
    "global_memory_read_logit_bias": "number", "memory_reader_hidden_size": "int",
    "memory_reader_residual_scale": "number", "memory_reader_read_only": "bool", "latent_memory_hidden_size": "int",
    "latent_memory_residual_scale": "number", "latent_memory_slots": "int", "latent_memory_init_std": "number",
    "latent_gate_init": "number", "delta_o_rmsnorm_eps": "number", "delta_scale_init": "number",
    "delta_scale_max": "number", "delta_scale_granularity": "str", "delta_scale_parameterization": "str",
}
_OUTPUT_INITS = ("zero", "random", "base_slice", "base_slice_fixed")
_GATED_BRANCHES = ("q", "k", "v", "o")


def _norm(value: Any) -> Any:
    """Their normalisation of string options (``str(x).strip().lower()``)."""
    return value.strip().lower() if isinstance(value, str) else value


def _same(value: Any, required: Any) -> bool:
    """``value`` is ``required`` (same JSON type: ``true`` is not ``1``; strings as their code normalises them)."""
    if isinstance(required, bool) or isinstance(value, bool):
        return value is required
    if isinstance(required, list):
        return isinstance(value, list | tuple) and list(value) == required
    return type(_norm(value)) is type(required) and _norm(value) == required


def _check_type(field: str, value: Any, kind: str) -> None:
    ok = {
        "number": isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise UnsupportedOfficialConfigError(field, value, f"expected a {kind}")


@dataclass(frozen=True)
class _OfficialLayout:
    """What the tensors file must hold, derived from the config."""

    active_heads: tuple[str, ...]  # corrected branches (a subset of q, o)
    lambda_tensors: str  # "required" (couple_lambda false), "ignored" (no_lambda: λ = 1), "absent"


def _read_config(data: dict[str, Any]) -> tuple[DeltaMemConfig, _OfficialLayout]:
    if not isinstance(data, dict):
        raise AdapterMismatchError(f"{OFFICIAL_CONFIG_NAME} must hold a JSON object")
    unknown = sorted(set(data) - set(OFFICIAL_DEFAULTS))
    if unknown:
        raise UnsupportedOfficialConfigError(unknown[0], data[unknown[0]],
                                             f"no such field in HFDeltaMemConfig at {OFFICIAL_COMMIT[:7]}")
    cfg = {**OFFICIAL_DEFAULTS, **data}

    for field, required in _ARCHIVED.items():
        if not _same(cfg[field], required):
            raise UnsupportedOfficialConfigError(field, cfg[field], f"an archived feature; only {required!r} is used")
    for field, (required, what) in _NOT_IMPLEMENTED.items():
        if cfg[field] is not required:
            raise UnsupportedOfficialConfigError(field, cfg[field], f"{what} is not implemented (needs {required!r})")
    for field, kind in {**_INIT_ONLY, **_INERT}.items():
        _check_type(field, cfg[field], kind)
    if _norm(cfg["output_init"]) not in _OUTPUT_INITS:
        raise UnsupportedOfficialConfigError("output_init", cfg["output_init"], f"expected one of {_OUTPUT_INITS}")

    for field in ("rank", "num_state_heads"):
        _check_type(field, cfg[field], "int")
        if cfg[field] < 1:
            raise UnsupportedOfficialConfigError(field, cfg[field], "must be >= 1")
    _check_type("alpha", cfg["alpha"], "number")
    for field in ("normalize_qk", "couple_lambda"):
        _check_type(field, cfg[field], "bool")

    modules = cfg["target_modules"]
    if isinstance(modules, str) or not isinstance(modules, list | tuple) or "self_attn" not in modules:
        raise UnsupportedOfficialConfigError("target_modules", modules, "δ-mem wraps the attention: needs 'self_attn'")
    layers = cfg["target_layers"]
    if not isinstance(layers, list | tuple) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise UnsupportedOfficialConfigError("target_layers", layers, "expected a list of layer indices")

    heads = cfg["delta_heads"]
    heads = [h.strip().lower() for h in heads.split(",")] if isinstance(heads, str) else [_norm(h) for h in heads]
    heads = [h for h in heads if h and h != "none"]
    if not heads:
        raise UnsupportedOfficialConfigError("delta_heads", cfg["delta_heads"], "no corrected branch")
    bad = [h for h in heads if h not in ("q", "o")]
    if bad:
        raise UnsupportedOfficialConfigError("delta_heads", cfg["delta_heads"],
                                             f"corrections of the {bad} branch(es); only q and o are implemented")

    mode = _norm(cfg["state_update_mode"])
    if mode not in ("standard", "lambda_outside", "no_lambda"):
        raise UnsupportedOfficialConfigError("state_update_mode", cfg["state_update_mode"],
                                             "expected standard, lambda_outside or no_lambda")
    if mode == "no_lambda":  # λ = 1 whatever couple_lambda says: the pure delta rule
        update_rule, lambda_tensors = "delta", ("absent" if cfg["couple_lambda"] else "ignored")
    elif cfg["couple_lambda"]:
        update_rule, lambda_tensors = "coupled", "absent"
    else:
        update_rule, lambda_tensors = "decoupled", "required"

    granularity = _norm(cfg["memory_write_granularity"])
    heads_n = cfg["num_state_heads"]
    if granularity == "token":
        write_mode, ssw_semantics = ("msw" if heads_n > 1 else "tsw"), "ours"
    elif granularity == "message_mean":
        if heads_n > 1:
            raise UnsupportedOfficialConfigError("num_state_heads", heads_n,
                                                 "message_mean writes with several sub-states are not implemented")
        write_mode, ssw_semantics = "ssw", "official"
    else:
        raise UnsupportedOfficialConfigError("memory_write_granularity", cfg["memory_write_granularity"],
                                             "only token and message_mean writes are implemented")

    try:
        config = _our_config(cfg, write_mode, tuple(layers), tuple(heads), update_rule, mode, ssw_semantics)
    except ValueError as exc:
        raise AdapterMismatchError(f"{OFFICIAL_CONFIG_NAME}: {exc}") from exc
    return config, _OfficialLayout(active_heads=config.branches, lambda_tensors=lambda_tensors)


def _our_config(cfg: dict[str, Any], write_mode: str, layers: tuple[int, ...], heads: tuple[str, ...],
                update_rule: str, mode: str, ssw_semantics: str) -> DeltaMemConfig:
    return DeltaMemConfig(
        rank=cfg["rank"],
        alpha=float(cfg["alpha"]),
        write_mode=write_mode,
        num_states=cfg["num_state_heads"],
        target_layers=layers or None,
        branches=heads,
        init="zero",
        beta_bias_init=float(cfg["beta_bias_init"]),
        update_rule=update_rule,
        lambda_bias_init=-float(cfg["beta_bias_init"]),  # their initial λ bias (init only)
        state_update_mode="lambda_outside" if mode == "lambda_outside" else "standard",
        normalize_qk=cfg["normalize_qk"],
        ssw_semantics=ssw_semantics,
    )


def config_from_official(data: dict[str, Any]) -> DeltaMemConfig:
    """Map the contents of a ``delta_mem_config.json`` to a :class:`DeltaMemConfig` (see the module docstring).

    Raises:
        UnsupportedOfficialConfigError: a field this library does not implement, naming the field and value.
    """
    return _read_config(data)[0]


# -- the tensors ---------------------------------------------------------------------------------------------------
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(\w+?)(?:\.weight)?$")
_PARTS = ("memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj", "beta_bias", "delta_q_proj",
          "delta_k_proj", "delta_v_proj", "delta_o_proj", "lambda_proj", "lambda_bias")


def _load_tensors(directory: Path) -> tuple[dict[str, Any], Path]:
    pt, st = directory / OFFICIAL_WEIGHTS_NAME, directory / OFFICIAL_SAFETENSORS_NAME
    if pt.is_file() and st.is_file():
        raise AdapterMismatchError(f"{directory} holds both {pt.name} and {st.name}; keep one")
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st)), st
    if not pt.is_file():
        raise FileNotFoundError(f"official δ-mem adapter file missing: {pt}")
    try:
        raw = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler refuses anything but plain tensors and containers
        raise AdapterMismatchError(f"{pt} is not a plain tensor state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise AdapterMismatchError(f"{pt} holds a {type(raw).__name__}, not a state dict")
    return raw, pt


def _layer_shapes(model: nn.Module, index: int, width: int) -> dict[str, tuple[int, ...]]:
    """The shape each official tensor of layer ``index`` must have on ``model``."""
    spec, layers = resolve_architecture(model)
    attn = getattr(layers[index], spec.attention)
    q, o = getattr(attn, spec.q_proj), getattr(attn, spec.o_proj)
    d = q.in_features
    shapes = {"memory_q_proj": (width, d), "memory_k_proj": (width, d), "memory_v_proj": (width, d),
              "beta_proj": (width, d), "beta_bias": (width,), "lambda_proj": (width, d), "lambda_bias": (width,),
              "delta_q_proj": (q.out_features, width), "delta_o_proj": (o.out_features, width)}
    for branch in ("k", "v"):
        proj = getattr(attn, f"{branch}_proj", None)
        if isinstance(proj, nn.Linear):
            shapes[f"delta_{branch}_proj"] = (proj.out_features, width)
    return shapes


def _layer_tensors(
    model: nn.Module, config: DeltaMemConfig, layout: _OfficialLayout, index: int, parts: dict[str, Tensor],
    prefix: str,
) -> dict[str, Tensor]:
    """Check one layer's official tensors and return ours (``in_proj``, ``beta_bias``, ``delta_*``, λ)."""
    shapes = _layer_shapes(model, index, config.state_width)
    need = ["memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj", "beta_bias"]
    need += [f"delta_{b}_proj" for b in layout.active_heads]
    if layout.lambda_tensors == "required":
        need += ["lambda_proj", "lambda_bias"]
    for name in need:
        if name not in parts:
            raise OfficialTensorError(f"{prefix}{name}", "missing from the adapter file")
    for name, t in parts.items():
        key = f"{prefix}{name}"
        if name.startswith("lambda_") and layout.lambda_tensors == "absent":
            raise OfficialTensorError(key, "present but the config couples λ to β (couple_lambda=true)")
        expect = shapes.get(name)
        if expect is not None and tuple(t.shape) != expect:
            raise OfficialTensorError(key, f"has shape {tuple(t.shape)}, this model needs {expect}")
        if not t.is_floating_point():
            raise OfficialTensorError(key, f"has dtype {t.dtype}, expected floating point")
        branch = name[len("delta_"):-len("_proj")] if name.startswith("delta_") else None
        if branch is not None and branch not in layout.active_heads:
            if bool(t.ne(0).any()):
                raise OfficialTensorError(key, f"is nonzero but delta_heads={list(layout.active_heads)} leave "
                                               f"the {branch} branch uncorrected (their code would ignore it)")
    out = {
        "in_proj": torch.cat([parts["memory_q_proj"], parts["memory_k_proj"], parts["memory_v_proj"],
                              parts["beta_proj"]], dim=0),
        "beta_bias": parts["beta_bias"].reshape(-1),
    }
    for b in layout.active_heads:
        out[f"delta_{b}"] = parts[f"delta_{b}_proj"]
    if layout.lambda_tensors == "required":
        out["lambda_proj"], out["lambda_bias"] = parts["lambda_proj"], parts["lambda_bias"].reshape(-1)
    return out


def import_official_adapter(model: nn.Module, directory: str | Path) -> DeltaMemModel:
    """Attach an adapter saved by the authors' ``save_delta_mem_adapter`` to ``model`` (a plain HF causal LM).

    Their SSW adapters (``memory_write_granularity="message_mean"``) get ``ssw_semantics="official"``.

    Raises:
        FileNotFoundError: a file is missing.
        UnsupportedOfficialConfigError: a config field this library does not implement (names field and value).
        OfficialTensorError: an unexpected, missing or misshapen tensor, or a nonzero inactive one (names it).
        AdapterMismatchError: the file is not a plain tensor state dict, or covers other layers than the config.
    The model is left unchanged (no adapter attached) when any of these is raised.
    """
    directory = Path(directory)
    cfg_path = directory / OFFICIAL_CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"official δ-mem adapter file missing: {cfg_path}")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterMismatchError(f"{cfg_path} is not valid JSON: {exc}") from exc
    config, layout = _read_config(data)
    raw, w_path = _load_tensors(directory)

    per_layer: dict[int, dict[str, Tensor]] = {}
    prefixes: dict[int, str] = {}
    for key, tensor in raw.items():
        m = _KEY.search(key) if isinstance(key, str) else None
        if m is None or m.group(2) not in _PARTS:
            raise OfficialTensorError(str(key), f"unexpected tensor in {w_path.name}")
        if not isinstance(tensor, Tensor):
            raise OfficialTensorError(key, f"is a {type(tensor).__name__}, not a tensor")
        index = int(m.group(1))
        per_layer.setdefault(index, {})[m.group(2)] = tensor
        prefixes[index] = key[: m.start(2)]
    _, decoder_layers = resolve_architecture(model)
    expected_layers = config.resolve_layers(len(decoder_layers))
    if tuple(sorted(per_layer)) != expected_layers:
        raise AdapterMismatchError(
            f"{w_path.name} holds layers {sorted(per_layer)} but the config targets {list(expected_layers)} "
            f"of this {len(decoder_layers)}-layer model")
    ours = {f"layers.{i}.{name}": t for i in expected_layers
            for name, t in _layer_tensors(model, config, layout, i, per_layer[i], prefixes[i]).items()}
    dm = attach(model, config)
    try:
        dm.load_adapter_state_dict(ours)
    except BaseException:
        dm.detach_adapter()
        raise
    return dm
