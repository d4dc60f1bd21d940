"""Model-level invariants of δ-mem on tiny random Llama, Qwen3 and Gemma 3 models and on the embedded model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, ids, randomize, tiny_model

from deltamem_agents import DeltaMemConfig, attach
from deltamem_agents.models.kv_cache import forward_with_cache, new_cache

MODES = ("tsw", "ssw", "msw")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_zero_state_reads_give_exact_base_logits(arch, mode):
    model = tiny_model(arch)
    x = ids(2, 19)
    with torch.no_grad():
        base = model(x).logits
    dm = attach(model, DeltaMemConfig(write_mode=mode, init="base_slice"))
    randomize(dm)  # nonzero correction weights: only a zero *state* can make the correction vanish
    with torch.no_grad():
        dm.reset_state(2)
        with dm.writes_disabled():
            assert torch.equal(dm(x).logits, base)
        dm.reset_state(2)
        first = dm(x).logits  # writes on: position 0 reads S0 = 0, later positions read what was written
        assert torch.equal(first[:, 0], base[:, 0])
        assert not torch.equal(first, base)
        # memory off, whatever the state holds
        with dm.memory_disabled():
            assert torch.equal(dm(x).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_untrained_adapter_is_exactly_the_base_model(arch):
    model = tiny_model(arch)
    x = ids(1, 23)
    with torch.no_grad():
        base = model(x).logits
        dm = attach(model, DeltaMemConfig(init="zero"))
        dm.reset_state(1)
        assert torch.equal(dm(x).logits, base)
        assert dm.state.memory[0].abs().sum() > 0  # the state was written even though the output is unchanged


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_then_decode_equals_full_pass(arch, mode):
    model = tiny_model(arch)
    dm = attach(model, DeltaMemConfig(write_mode=mode, chunk_size=8))
    randomize(dm)
    x = ids(2, 41)
    seg = None
    if mode == "ssw":  # messages of 5, 9 and 12 tokens, then one-token writes
        seg = torch.tensor([0] * 5 + [1] * 9 + [2] * 12 + list(range(3, 18)))[None].repeat(2, 1)
    with torch.no_grad():
        dm.reset_state(2)
        full = dm(x, segment_ids=seg).logits
        full_state = dm.get_state()

        dm.reset_state(2)
        cache = new_cache(model.config)
        parts, pos = [], 0
        for end in (11, 26, *range(27, 42)):  # two prefill chunks that cut messages, then token by token
            sl = slice(pos, end)
            out = forward_with_cache(dm, cache, x[:, sl], segment_ids=None if seg is None else seg[:, sl])
            parts.append(out.logits)
            pos = end
        stepped = torch.cat(parts, dim=1)
    torch.testing.assert_close(stepped, full, atol=2e-4, rtol=1e-4)
    for a, b in zip(dm.get_state().memory, full_state.memory, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache_and_left_padding_leaves_state_untouched_by_pads(arch):
    model = tiny_model(arch)
    model.generation_config.pad_token_id = 0
    dm = attach(model, DeltaMemConfig())
    randomize(dm)
    short, long = ids(1, 6, seed=3), ids(1, 10, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1), torch.ones(1, 10)]).long()
    with torch.no_grad():
        # prompt only: the padded row's state must equal running the short prompt alone
        dm.reset_state(2)
        dm(batch, attention_mask=mask)
        padded = dm.get_state(rows=0)
        dm.reset_state(1)
        dm(short)
        alone = dm.get_state()
        for a, b in zip(padded.memory, alone.memory, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

        dm.reset_state(2)
        out = dm.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
        after_generate = dm.get_state(rows=0)
        assert out.shape == (2, 15)
        # row 0 alone, unpadded: its prompt plus the 4 generated tokens that were fed back (not the last one)
        dm.reset_state(1)
        dm(torch.cat([short, out[:1, 10:14]], 1))
        for a, b in zip(dm.get_state().memory, after_generate.memory, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,expected", [("tsw", 4_866_336), ("msw", 19_465_344)])
def test_trainable_parameter_count_matches_the_paper_on_qwen3_4b(mode, expected):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    dm = attach(model, DeltaMemConfig(write_mode=mode))
    assert dm.num_trainable_parameters() == expected
    assert sum(p.numel() for p in dm.delta_layers.parameters()) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_only_delta_weights_are_trainable(arch):
    dm = attach(tiny_model(arch), DeltaMemConfig())
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("delta_layers.") for n in trainable)
    assert not any(p.requires_grad for p in dm.base_model.parameters())


def test_gradients_flow_through_the_write_pass_into_every_delta_weight():
    model = tiny_model("llama")
    dm = attach(model, DeltaMemConfig(chunk_size=4))
    dm.train()
    dm.reset_state(2)
    dm(ids(2, 13))  # write pass, graph kept
    with dm.writes_disabled():
        logits = dm(ids(2, 5, seed=9)).logits
    logits.float().pow(2).mean().backward()
    for name, p in dm.delta_layers.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.embedded
def test_embedded_model_invariants(embedded):
    model, tok = embedded
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "My favourite colour is teal. What is 2 + 2?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        base = model(prompt).logits
    dm = attach(model, DeltaMemConfig())
    try:
        with torch.no_grad():
            dm.reset_state(1)
            with dm.writes_disabled():
                assert torch.equal(dm(prompt).logits, base)
            with dm.memory_disabled():
                assert torch.equal(dm(prompt).logits, base)
            # chunked prefill + decode == full pass on the real model
            randomize(dm, scale=0.5)
            dm.reset_state(1)
            full = dm(prompt).logits
            full_state = dm.get_state()
            dm.reset_state(1)
            cache = new_cache(model.config)
            T = prompt.shape[1]
            a = forward_with_cache(dm, cache, prompt[:, : T - 5]).logits
            rest = [forward_with_cache(dm, cache, prompt[:, t : t + 1]).logits for t in range(T - 5, T)]
            torch.testing.assert_close(torch.cat([a, *rest], 1), full, atol=5e-4, rtol=1e-4)
            for x, y in zip(dm.get_state().memory, full_state.memory, strict=True):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
            out = dm.generate(prompt, max_new_tokens=4, do_sample=False)
            assert out.shape[1] == T + 4
    finally:
        dm.detach_adapter()
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, base)  # detaching restores the untouched base model
