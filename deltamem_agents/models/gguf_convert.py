"""Converting the verified GGUF into a plain float32 transformers checkpoint, once, atomically.

The GGUF is loaded with transformers (dequantized to float32), stripped of what the GGUF loader leaves behind,
and saved as safetensors with a config and tokenizer config that mean the same model to every transformers
version we support, plus ``deltamem_manifest.json`` naming the source file and the versions used.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..files import atomic_directory
from .embedded_spec import MANIFEST_FORMAT, MANIFEST_NAME, EmbeddedModelSpec
from .progress import transformers_progress

__all__ = ["convert_gguf", "load_from_gguf", "match_gguf_bos"]


def _strip_quantization(model: Any) -> Any:
    """Drop what transformers leaves on a model loaded from a GGUF, so it saves and reloads as a plain
    float32 checkpoint (no ``quantization_config``, no quantizer; see ``HfQuantizer.remove_quantization_config``)."""
    from transformers import PreTrainedModel

    model.hf_quantizer = None
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    if "is_quantized" in vars(model):
        model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            configs = {id(module.config): module.config}
            with contextlib.suppress(Exception):
                text = module.config.get_text_config()
                configs[id(text)] = text
            for config in configs.values():
                if hasattr(config, "quantization_config"):
                    del config.quantization_config
                if getattr(config, "_is_quantized", False):
                    config._is_quantized = False
    return model


def load_from_gguf(gguf_path: Path, progress: bool = True) -> tuple[Any, Any]:
    """Load the GGUF (dequantized to float32) and its tokenizer, with the quantizer stripped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.eval()
    return _strip_quantization(model), match_gguf_bos(tokenizer, gguf_path)


def match_gguf_bos(tokenizer: Any, gguf_path: Path) -> Any:
    """Make the tokenizer add a BOS token exactly when the GGUF file says so (``tokenizer.ggml.add_bos_token``).

    transformers 4.x builds GGUF tokenizers of ``gpt2``-type vocabularies as ``LlamaTokenizerFast`` with
    ``add_bos_token=True`` whatever the file says (SmolLM2's says false), so the same file tokenized differently
    under 4.x and 5.x. Files without the field are left as transformers made them.
    """
    import gguf as gguf_py

    field = gguf_py.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None:
        return tokenizer
    wanted = bool(field.contents())
    if getattr(tokenizer, "add_bos_token", wanted) != wanted:
        tokenizer.add_bos_token = wanted  # the fast Llama tokenizer rebuilds its post-processor on assignment
        probe = tokenizer("a").input_ids
        if (tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]) != wanted:
            raise RuntimeError(f"could not make the tokenizer of {gguf_path} follow add_bos_token={wanted}")
    return tokenizer


def convert_gguf(gguf_path: Path, final: Path, spec: EmbeddedModelSpec, progress: bool) -> Path:
    """Convert the verified GGUF into a float32 safetensors directory at *final*, atomically. Caller holds the lock."""
    import gguf as gguf_py
    import torch
    import transformers

    steps = [
        "load GGUF (dequantize to float32)",
        "save model (safetensors)",
        "save tokenizer",
        "write manifest",
    ]
    source_sha = spec.sha256

    def build(tmp: Path) -> None:
        started = time.perf_counter()
        with tqdm(total=len(steps), unit="step", desc=f"Converting {spec.name}", disable=not progress) as bar:
            bar.set_postfix_str(steps[0])
            model, tokenizer = load_from_gguf(gguf_path, progress=progress)
            bar.update()
            bar.set_postfix_str(steps[1])
            with transformers_progress(progress):
                model.save_pretrained(tmp, safe_serialization=True)
            _portable_model_config(tmp / "config.json")
            bar.update()
            bar.set_postfix_str(steps[2])
            max_positions = getattr(model.config, "max_position_embeddings", None)
            if max_positions and tokenizer.model_max_length > max_positions:
                tokenizer.model_max_length = max_positions  # a GGUF carries no limit of its own
            tokenizer.save_pretrained(tmp)
            _portable_tokenizer_config(tmp / "tokenizer_config.json")
            bar.update()
            bar.set_postfix_str(steps[3])
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            leftovers = sorted(key for key in config if "quantiz" in key or "gguf" in key)
            if leftovers:
                raise RuntimeError(f"converted config.json still has quantization entries: {leftovers}")
            manifest = {
                "format": MANIFEST_FORMAT,
                "model": spec.name,
                "license": spec.license,
                "architecture": spec.architecture,
                "chat_format": spec.chat_format,
                "dtype": "float32",
                "source": {
                    "index": "PyPI",
                    "package": spec.package,
                    "version": spec.version,
                    "wheel_member": spec.member,
                    "size": spec.size,
                    "sha256": source_sha,
                },
                "converted_with": {
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "gguf": getattr(gguf_py, "__version__", None) or _dist_version("gguf"),
                    "python": sys.version.split()[0],
                },
                "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "conversion_seconds": round(time.perf_counter() - started, 2),
            }
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            bar.update()
            bar.set_postfix_str("done")

    return atomic_directory(final, build)


def _portable_model_config(path: Path) -> None:
    """Make the saved ``config.json`` mean the same model to transformers 4.x and 5.x.

    transformers 5 writes the RoPE settings only as ``rope_parameters``; 4.x does not read that key and silently
    falls back to its default ``rope_theta`` (10,000 instead of SmolLM2's 100,000: a different model whose
    logits agree only at position 0). Write the 4.x keys beside it; 5.x reads ``rope_parameters`` first.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return
    if set(rope) - {"rope_theta", "rope_type"} or rope.get("rope_type", "default") != "default":
        raise RuntimeError(f"cannot express rope_parameters={rope} for transformers 4.x")
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = None
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _portable_tokenizer_config(path: Path) -> None:
    """Make the saved tokenizer config loadable by every transformers version we support.

    transformers 5 saves ``"tokenizer_class": "TokenizersBackend"`` (and a ``backend`` key), a class 4.x does
    not have; both read ``PreTrainedTokenizerFast`` (5.x maps it to its backend class). It also stores how the
    tokenizer was loaded (``is_local``, ``local_files_only``): that describes this machine's load, not the
    tokenizer, so it is left out.
    """
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in (*_LOAD_KWARGS, "backend"):
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_LOAD_KWARGS = ("is_local", "local_files_only")


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
