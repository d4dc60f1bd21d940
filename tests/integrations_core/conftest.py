"""Fixtures of the integration core's tests: a tiny random Llama with the embedded tokenizer (no weights to
fetch, only the tokenizer files), saved as a model directory too, and engines on SQLite files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (ChatML template, vocab 49,152) — no model weights needed."""
    from transformers import AutoTokenizer

    from deltamem_agents.models import embedded_model_dir

    path = embedded_model_dir()
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip("embedded model not fetched (run `deltamem model fetch`)")
    return AutoTokenizer.from_pretrained(path)


def _tiny_llama() -> Any:
    """A random 2-layer Llama with the embedded tokenizer's vocabulary (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A model directory (weights and tokenizer) that ``MemoryEngine("<dir>")`` loads by path."""
    path = tmp_path_factory.mktemp("tiny-model") / "tiny-llama"
    _tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def make_engine(tokenizer, tmp_path):
    """``make_engine(**kwargs)`` → a greedy MemoryEngine on a fresh tiny model (adapter attached) and an SQLite
    file ``tmp_path / "sessions.db"`` (closed at the end of the test)."""
    from deltamem_agents.adapter import DeltaMemConfig, attach
    from deltamem_agents.engine import MemoryEngine, SamplingParams

    engines: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("store", f"sqlite:///{tmp_path / 'sessions.db'}")
        kwargs.setdefault("sampling", SamplingParams(temperature=0.0))
        kwargs.setdefault("max_new_tokens", 3)
        engine = MemoryEngine((attach(_tiny_llama(), DeltaMemConfig()), tokenizer), **kwargs)
        engines.append(engine)
        return engine

    yield make
    from deltamem_agents.integrations import close_ephemeral_engine

    for engine in engines:
        close_ephemeral_engine(engine)
        engine.close()


@pytest.fixture
def clean_registry():
    """The engine registry emptied before and after the test (closing what the test registered)."""
    from deltamem_agents.integrations import clear_engines

    clear_engines()
    yield
    clear_engines()
