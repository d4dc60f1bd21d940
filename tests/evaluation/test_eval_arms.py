"""The arms on a tiny random Llama driven by the real (embedded) tokenizer: prefix caching is exact, δ-mem
writes happen once, every arm runs, the evidence split is right, and reports are written."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from deltamem_agents.adapter import DeltaMemConfig, attach
from deltamem_agents.evaluation import ARM_NAMES, EvalConfig, LanguageModel, evaluate, write_report
from deltamem_agents.evaluation.prompts import PromptRenderer
from deltamem_agents.evaluation.report import load_run, summarize
from deltamem_agents.evaluation.tasks import EvalTask
from deltamem_agents.training.examples import MemoryExample


def _randomize(dm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta_layers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 1.0))


@pytest.fixture
def plain(tiny_llama, tokenizer):
    return LanguageModel(tiny_llama, tokenizer)


def _memory_lm(tiny_llama, tokenizer, mode="tsw"):
    dm = attach(copy.deepcopy(tiny_llama), DeltaMemConfig(write_mode=mode))
    _randomize(dm)
    return LanguageModel(None, tokenizer, dm)


def _greedy_reference(model, ids, steps):
    """Greedy decoding by re-running the whole sequence each step (no cache at all)."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == 2:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_prefix_cache_generation_is_exact(plain, tiny_llama):
    prefix_ids, suffix = list(range(100, 140)), list(range(300, 310))
    prefix = plain.prefix(prefix_ids)
    _, got = plain.generate(prefix, suffix, 6)
    assert got == _greedy_reference(tiny_llama, prefix_ids + suffix, 6)
    # reusing the prefix for a second question gives the same answer (the cache is never mutated)
    assert plain.generate(prefix, suffix, 6)[1] == got
    plain.prefill_chunk_tokens = 7  # a prefix run in pieces gives the same cache
    assert plain.generate(plain.prefix(prefix_ids), suffix, 6)[1] == got


def test_choice_logprobs_batched_equal_single(plain, tiny_llama):
    prefix_ids, suffix = list(range(100, 130)), [400, 401]
    choices = [[500], [501, 502, 503], [504, 505]]
    prefix = plain.prefix(prefix_ids)
    batched = plain.choice_logprobs(prefix, suffix, choices)
    for (total, n), choice in zip(batched, choices, strict=True):
        full = prefix_ids + suffix + choice
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(input_ids=torch.tensor([full])).logits[0].float(), -1)
        start = len(prefix_ids) + len(suffix)
        ref = sum(float(logp[start - 1 + j, t]) for j, t in enumerate(choice))
        assert n == len(choice)
        assert total == pytest.approx(ref, abs=1e-4)
    plain.choice_batch_tokens = 1  # forces one choice per batch: same numbers
    single = plain.choice_logprobs(prefix, suffix, choices)
    assert [s for s, _ in single] == pytest.approx([s for s, _ in batched], abs=1e-4)


def test_online_prefix_state_handoff_is_exact(tiny_llama, tokenizer):
    lm = _memory_lm(tiny_llama, tokenizer)
    prefix_ids, suffix, choice = list(range(100, 150)), [400, 401], [500, 501]
    lm.prefill_chunk_tokens = 16  # the state and cache carry across prefill pieces
    prefix = lm.prefix(prefix_ids, mode="write")
    (total, _), = lm.choice_logprobs(prefix, suffix, [choice])
    lm.memory.reset_state(1)  # reference: one pass over everything, writes on from a fresh state
    with torch.no_grad():
        logp = torch.log_softmax(lm.memory(input_ids=torch.tensor([prefix_ids + suffix + choice])).logits[0], -1)
    start = len(prefix_ids) + len(suffix)
    ref = sum(float(logp[start - 1 + j, t]) for j, t in enumerate(choice))
    assert total == pytest.approx(ref, abs=1e-4)
    # and the memory matters: the plain model scores the same tokens differently
    with lm.memory.memory_disabled(), torch.no_grad():
        base = torch.log_softmax(lm.memory(input_ids=torch.tensor([prefix_ids + suffix + choice])).logits[0], -1)
    assert abs(sum(float(base[start - 1 + j, t]) for j, t in enumerate(choice)) - ref) > 1e-3


def test_write_history_writes_each_message_once(tiny_llama, tokenizer):
    lm = _memory_lm(tiny_llama, tokenizer)
    messages = [list(range(100 + 10 * i, 107 + 10 * i)) for i in range(5)]
    state = lm.write_history(messages, chunk_tokens=10_000)
    lm.memory.reset_state(1)
    with torch.no_grad():
        lm.memory(input_ids=torch.tensor([[t for m in messages for t in m]]))
    assert state.equal(lm.memory.get_state())  # one chunk == one pass over the concatenation
    chunked = lm.write_history(messages, chunk_tokens=8)
    assert chunked.is_finite() and not chunked.equal(state)  # fresh positions per chunk
    assert not lm.write_history(messages[:-1], 10_000).equal(state)


def test_write_history_one_call_per_message_is_the_engines_way(tiny_llama, tokenizer):
    lm = _memory_lm(tiny_llama, tokenizer)
    messages = [list(range(100 + 10 * i, 103 + 2 * i + 10 * i)) for i in range(4)]  # odd, unequal lengths
    state = lm.write_history(messages, chunk_tokens=0)
    lm.memory.reset_state(1)
    with torch.no_grad():
        for m in messages:
            lm.memory(input_ids=torch.tensor([m]))
    assert state.equal(lm.memory.get_state())
    with pytest.raises(ValueError, match="chunk_tokens"):
        lm.write_history(messages, chunk_tokens=-1)


def test_write_history_sequence_write_closes_last_message(tiny_llama, tokenizer):
    lm = _memory_lm(tiny_llama, tokenizer, mode="ssw")
    messages = [list(range(100 + 10 * i, 105 + 10 * i)) for i in range(3)]
    full = lm.write_history(messages, chunk_tokens=4)  # messages split across calls keep one write each
    fewer = lm.write_history(messages[:2], chunk_tokens=4)
    assert not all(torch.equal(a, b) for a, b in zip(full.memory, fewer.memory, strict=True))


def _task(n_filler=6):
    filler = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Filler message number {i} about weather."}
              for i in range(n_filler)]  # fmt: skip
    history = [{"role": "user", "content": "My dog is called Biscuit."}, {"role": "assistant", "content": "Cute."}]
    history += filler
    examples = [
        MemoryExample("q-dog", "conversation", history, "What is my dog called?", ["Biscuit"], evidence=[0]),
        MemoryExample("q-dog-again", "conversation", history, "What is my dog called?", ["Biscuit"], evidence=[0]),
        MemoryExample("q-last", "conversation", history, "What was the last filler?", ["5"], evidence=[len(history) - 1]),
        MemoryExample("q-choice", "conversation", history, "Dog?", ["Biscuit"], choices=["Biscuit", "Rex"], evidence=[0]),
        MemoryExample("q-none", "conversation", history[:2], "Dog name?", ["Biscuit"]),
    ]  # fmt: skip
    return EvalTask("conversation", examples)


def test_every_arm_runs_with_evidence_split(tiny_llama, tokenizer, tmp_path):
    lm = _memory_lm(tiny_llama, tokenizer)
    renderer = PromptRenderer(tokenizer)
    task = _task()
    window = sum(len(renderer.message_ids(m)) for m in task.examples[0].history[-3:])
    cfg = EvalConfig(window_tokens=window, max_new_tokens=3, context_tokens=512, progress=False)
    run = evaluate(task, lm, ARM_NAMES, cfg)
    assert len(run.records) == len(ARM_NAMES) * len(task.examples)
    by = {(r.arm, r.example_id): r for r in run.records}
    assert {by[(a, "q-dog")].evidence for a in ARM_NAMES} == {"outside"}
    assert by[("window", "q-last")].evidence == "inside"
    assert by[("window", "q-none")].evidence == "unknown"
    tokens = {a: by[(a, "q-dog")].prompt_tokens for a in ARM_NAMES}
    assert tokens["none"] < tokens["window"] < tokens["full"]
    assert tokens["deltamem"] == tokens["window"] and tokens["deltamem-online"] == tokens["full"]
    assert by[("bm25", "q-dog")].extra["retrieved"] == [0]  # "dog" retrieves the evidence turn
    for arm in ARM_NAMES:  # no state or cache leaks from one question to the next
        assert by[(arm, "q-dog")].prediction == by[(arm, "q-dog-again")].prediction
    assert by[("window", "q-choice")].prediction in ("Biscuit", "Rex")
    assert len(run.costs) == len(ARM_NAMES) and all(c.peak_rss_mib > 0 for c in run.costs)
    paths = write_report(run, tmp_path / "out", command="deltamem eval conversation ...")
    data = json.loads(paths["json"].read_text())
    assert set(data["summary"]["splits"]) == {"outside", "inside", "unknown", "all"}
    assert data["summary"]["splits"]["outside"]["none"]["n"] == 3
    md = paths["md"].read_text()
    assert "Evidence outside the window" in md and "| deltamem-online |" in md
    assert paths["png"].stat().st_size > 1000
    again, command = load_run(paths["json"])  # results.json round-trips (re-rendering a report)
    assert command == "deltamem eval conversation ..."
    assert summarize(again)["splits"]["all"] == summarize(run)["splits"]["all"]


def test_memory_arms_need_an_adapter(plain):
    with pytest.raises(ValueError, match="need a δ-mem adapter"):
        evaluate(_task(), plain, ["window", "deltamem"], EvalConfig(progress=False))
    with pytest.raises(ValueError, match="unknown arm"):
        evaluate(_task(), plain, ["window", "rag"], EvalConfig(progress=False))
