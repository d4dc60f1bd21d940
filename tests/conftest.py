"""Shared fixtures: the real embedded model (tiny random models live in ``tiny_models.py``)."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import ARCHS, ids, randomize, tiny_model  # noqa: F401  (re-exported for older imports)

# Without a GPU the Triton kernels run only through Triton's interpreter, and triton reads this switch when it is
# first imported (its standard library is built then) — which building any transformers model does. So it is set
# here, before any test runs; it changes nothing for code that does not launch Triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct; fetched by `deltamem model fetch`."""
    from deltamem_agents.models import EmbeddedModelUnavailable, load_embedded_model

    try:
        return load_embedded_model(fetch=bool(os.environ.get("CI")), progress=False)
    except EmbeddedModelUnavailable as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            raise
        pytest.skip(f"embedded model not fetched (run `deltamem model fetch`): {exc}")
