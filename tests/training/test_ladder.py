"""The ladder trainer's fast write pass equals the engine's way of writing (one call per message from position
0), its data is held out as claimed, and a short run on the embedded model trains and logs every diagnostic."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import randomize, tiny_model

from deltamem_agents import DeltaMemConfig, attach
from deltamem_agents.training.data.synthetic import value_split
from deltamem_agents.training.ladder import LadderConfig, LadderRun, ladder_example, plot_runs, write_contexts
from deltamem_agents.training.ladder import main as ladder_main


def _contexts():
    g = torch.Generator().manual_seed(0)
    lens = [[5, 9, 3], [7], [4, 4, 11, 2]]  # odd lengths, one single-message context
    return [[torch.randint(3, 96, (n,), generator=g).tolist() for n in ctx] for ctx in lens]


@pytest.mark.parametrize(("mode", "rule"), [("tsw", "coupled"), ("tsw", "delta"), ("msw", "decoupled"),
                                            ("ssw", "delta"), ("ssw", "coupled")])
def test_fast_write_equals_one_call_per_message(mode, rule):
    dm = attach(tiny_model("llama", layers=3), DeltaMemConfig(write_mode=mode, update_rule=rule, steer_writes=False))
    randomize(dm)
    contexts = _contexts()
    with torch.no_grad():
        written = write_contexts(dm, contexts, pad_id=0)
        for b, ctx in enumerate(contexts):
            dm.reset_state(1)
            for j, m in enumerate(ctx):
                seg = torch.full((1, len(m)), j) if mode == "ssw" else None
                dm(torch.tensor([m]), segment_ids=seg)
            want = dm.get_state()
            got = written.state.select([b])
            for a, w in zip(got.memory, want.memory, strict=True):
                torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)
            if mode == "ssw":
                for a, w in zip(got.pending_sum, want.pending_sum, strict=True):
                    torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)
                assert torch.equal(got.pending_count, want.pending_count)


def test_fast_write_keeps_the_gradient_to_the_adapter():
    dm = attach(tiny_model("llama"), DeltaMemConfig(update_rule="delta", steer_writes=False))
    randomize(dm)
    written = write_contexts(dm, _contexts(), pad_id=0)
    sum(m.square().sum() for m in written.state.memory).backward()
    layer = next(iter(dm.delta_layers.values()))
    assert layer.in_proj.grad is not None and layer.in_proj.grad.abs().sum() > 0
    assert all(not p.requires_grad or p.grad is None for p in dm.base_model.parameters())


def test_fast_write_refuses_a_steering_adapter_and_empty_messages():
    dm = attach(tiny_model("llama"), DeltaMemConfig())
    with pytest.raises(ValueError, match="steer_writes"):
        write_contexts(dm, _contexts(), pad_id=0)
    dm2 = attach(tiny_model("llama"), DeltaMemConfig(steer_writes=False))
    with pytest.raises(ValueError, match="at least one"):
        write_contexts(dm2, [[[1, 2], []]], pad_id=0)


def test_steer_writes_false_runs_the_base_unchanged_while_writing():
    model = tiny_model("llama")
    x = torch.randint(3, 96, (1, 13))
    with torch.no_grad():
        base = model(x).logits
        dm = attach(model, DeltaMemConfig(steer_writes=False))
        randomize(dm)
        dm.reset_state(1)
        dm(x[:, :6])
        assert torch.equal(dm(x).logits, base)  # a writing call: no steering although the state is nonzero
        with dm.writes_disabled():
            assert not torch.equal(dm(x).logits, base)  # a read-only call is steered


def test_ladder_examples_are_deterministic_and_held_out():
    a = ladder_example(7, split="heldout", rung="L1", distractors=4)
    assert a == ladder_example(7, split="heldout", rung="L1", distractors=4)
    assert len(a.history) == 2 + 2 * 4 and a.evidence == [0]
    assert value_split(a.meta["slot"], a.answers[0]) == "heldout"
    assert a.answers[0] in a.choices and len(a.choices) == 4
    t = ladder_example(7, split="train", rung="L0", distractors=0)
    assert len(t.history) == 2 and value_split(t.meta["slot"], t.answers[0]) == "train"


@pytest.mark.parametrize(("kwargs", "match"), [({"rung": "L9"}, "rung"), ({"distractors": ()}, "distractors"),
                                                ({"recon_frac": 2.0}, "recon_frac"), ({"steps": 0}, "steps"),
                                                ({"adapter": {"update_rule": "nope"}}, "update_rule")])
def test_ladder_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LadderConfig(**kwargs)


@pytest.mark.embedded
@pytest.mark.slow
@pytest.mark.parametrize("wide", [False, True])
def test_short_ladder_run_trains_and_logs_diagnostics(embedded, tmp_path, wide):
    model, tok = embedded
    extra = {"wide_value": True, "branches": ["o"], "wide_gain_init": 0.1} if wide else {}
    config = LadderConfig(steps=2, contexts_per_step=3, eval_every=2, eval_n=4, recon_frac=0.5,
                          adapter={"update_rule": "delta", "target_layers": "last_quarter", **extra})
    dm = attach(model, config.adapter_config())
    before = {k: v.clone() for k, v in dm.adapter_state_dict().items()}
    try:
        out = LadderRun(config, dm, tok, tmp_path / "run").run()
        after = dm.adapter_state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    finally:
        dm.detach_adapter()
    recs = [json.loads(x) for x in (tmp_path / "run" / "ladder_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 2]
    for key in ("acc_state", "acc_zero", "answer_nll_state", "answer_nll_zero", "answer_nll_corrupt", "answer_nll_swap", "beta_fact",
                "beta_other", "retention_gap"):
        assert key in recs[-1]
    assert recs[-1]["retention_gap"] == 1.0  # the pure delta rule keeps everything
    assert (out / "adapter_model.safetensors").is_file() and (tmp_path / "run" / "best").is_dir()
    plot_runs({"run": tmp_path / "run" / "ladder_log.jsonl"}, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0

    # evaluate-only mode: the saved adapter, at two distractor counts
    assert ladder_main(["--evaluate", str(out), "--eval-n", "4", "--distractors", "0,1", "--rung", "L1",
                        "--out", str(tmp_path / "eval")]) == 0
    evals = [json.loads(x) for x in (tmp_path / "eval" / "evaluation.jsonl").read_text().splitlines()]
    assert [e["distractors"] for e in evals[:2]] == [0, 1] and all(e["n"] == 4 for e in evals[:2])
    general = evals[2]
    assert general["general_ppl_fresh"] == pytest.approx(general["general_ppl_plain"], rel=1e-6)
    assert general["conversation_tokens"] > 500
