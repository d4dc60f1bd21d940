"""Helpers of the engine tests (a module of its own: two files named conftest cannot import each other)."""

from __future__ import annotations

import torch


def randomize(dm, seed: int = 1, scale: float = 1.0) -> None:
    """Give an untrained adapter weights large enough that the memory visibly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dm.delta_layers.values():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale * (0.3 if p.dim() == 2 else 1.0))


def make_tiny_dm(write_mode: str = "tsw", seed: int = 0, layers: int = 2, arch: str = "llama", **config):
    """A random Llama (or ``arch="qwen3"``, or ``"gemma3"`` with a 16-token sliding window on its local layers)
    (2 layers by default) (vocab 49,152: the embedded tokenizer's) with a randomised δ-mem adapter that visibly
    moves the logits (``config``: more :class:`DeltaMemConfig` fields)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

    from deltamem_agents.adapter import DeltaMemConfig, attach

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen3":
        cfg = Qwen3Config(head_dim=16, **common)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(head_dim=16, sliding_window=16, **common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    dm = attach(model, DeltaMemConfig(write_mode=write_mode, **config))
    randomize(dm, seed=seed + 1)
    return dm


def conversation(n_turns: int = 3) -> list[dict]:
    """A fixed user/assistant history of ``n_turns`` exchanges (with a system message first)."""
    msgs = [{"role": "system", "content": "You are a terse assistant."}]
    facts = ["My name is Ada.", "I live in Lisbon.", "My cat is called Pixel.", "I like green tea.",
             "The code is 4417.", "My sister is Rosa."]
    for i in range(n_turns):
        msgs.append({"role": "user", "content": facts[i % len(facts)]})
        msgs.append({"role": "assistant", "content": f"Noted, fact {i}."})
    return msgs
