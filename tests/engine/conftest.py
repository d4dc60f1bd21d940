"""Engine fixtures: a tiny random Llama with the embedded tokenizer's vocabulary (fast logic tests)."""

from __future__ import annotations

import pytest
from engine_helpers import make_tiny_dm


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (ChatML template, vocab 49,152) — no model weights needed."""
    from transformers import AutoTokenizer

    from deltamem_agents.models import embedded_model_dir

    path = embedded_model_dir()
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip("embedded model not fetched (run `deltamem model fetch`)")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_dm():
    return make_tiny_dm()


@pytest.fixture
def make_engine(tiny_dm, tokenizer):
    """``make_engine(store=None, dm=None, **kwargs)`` → a MemoryEngine on the tiny model (in-memory store).

    Defaults for these logic tests: ``windowed`` mode and greedy decoding (the tests of ``online`` mode and of the
    sampling defaults ask for them explicitly)."""
    from deltamem_agents.engine import MemoryEngine, SamplingParams
    from deltamem_agents.store.memory import InMemorySessionStore

    def make(store=None, dm=None, **kwargs):
        kwargs.setdefault("window_tokens", 64)
        kwargs.setdefault("mode", "windowed")
        kwargs.setdefault("sampling", SamplingParams(temperature=0.0))
        return MemoryEngine((dm or tiny_dm, tokenizer), store=store or InMemorySessionStore(), **kwargs)

    return make
