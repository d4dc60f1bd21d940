"""Fixtures for the evaluation tests: the embedded tokenizer and a tiny random Llama that shares its vocabulary."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer(embedded):
    """The embedded SmolLM2 tokenizer (ChatML template); skips when the model is not fetched."""
    return embedded[1]


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random Llama with SmolLM2's vocabulary size, so the real tokenizer drives it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
