"""Tiny random models of each supported family, shared by the test packages (imported as ``tiny_models``:
a unique module name, so it never collides with the per-directory ``conftest`` modules)."""

from __future__ import annotations

import torch


def tiny_model(arch: str, seed: int = 0, layers: int = 2):
    """A small random causal LM of the given family (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=512,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common)
    elif arch == "qwen3":
        from transformers import Qwen3Config

        cfg = Qwen3Config(head_dim=16, **common)
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(head_dim=16, sliding_window=8, **common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


ARCHS = ("llama", "qwen3", "gemma3")


def randomize(dm, seed: int = 1, scale: float = 1.0) -> None:
    """Give an untrained adapter weights large enough that the memory visibly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dm.delta_layers.values():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale * (0.3 if p.dim() == 2 else 1.0))


def ids(batch: int, length: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


