"""Synthetic generator determinism, the held-out split, and the file-task loaders on the real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltamem_agents.training.data import (
    SLOT_NAMES,
    curriculum_level,
    list_tasks,
    load_task,
    synthetic_dialogues,
    synthetic_group,
    value_split,
)
from deltamem_agents.training.data.synthetic import SLOTS, sample_value

REPO = Path(__file__).resolve().parents[2]
BENCH = Path(os.environ.get("DELTAMEM_BENCHMARKS_DIR", REPO.parent / "shared" / "benchmarks"))
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason=f"benchmarks not found at {BENCH} "
                                 "(set DELTAMEM_BENCHMARKS_DIR)")


def test_synthetic_is_deterministic():
    a = synthetic_dialogues(30, split="train", seed=3, level=None)
    b = synthetic_dialogues(30, split="train", seed=3, level=None)
    assert [(e.history, e.question, e.answers, e.choices, e.meta) for e in a] == [
        (e.history, e.question, e.answers, e.choices, e.meta) for e in b]
    c = synthetic_dialogues(30, split="train", seed=4, level=None)
    assert [e.history for e in a] != [e.history for e in c]


def test_synthetic_example_structure():
    for level in range(4):
        for i in range(40):
            group = synthetic_group(i, split="train", seed=0, level=level, questions_per_context=4)
            assert 1 <= len(group) <= 4
            assert len({e.meta["group"] for e in group}) == 1
            assert all(e.history == group[0].history for e in group)
            for e in group:
                assert e.choices is not None and len(e.choices) == 4 and len(set(e.choices)) == 4
                assert e.answer in e.choices
                assert e.evidence and all(e.history[j]["role"] == "user" for j in e.evidence)
                # The answer (or, for tasks, the plan step) is stated in the evidence message.
                assert any(e.answer in e.history[j]["content"] for j in e.evidence)
                assert e.meta["slot"] in SLOT_NAMES and e.meta["level"] == level
                if level == 0:
                    assert e.meta["n_distractors"] == 0 and e.meta["n_facts"] == 1


def test_updates_latest_value_wins():
    found = 0
    for i in range(200):
        for e in synthetic_group(i, split="train", seed=0, level=3):
            if e.meta["updated"] and e.meta["slot"] != "task":
                found += 1
                last = max(e.evidence)
                assert e.answer in e.history[last]["content"]
                assert e.history[last]["content"].startswith(("Correction", "Update", "Actually"))
    assert found > 20


def test_heldout_values_never_in_train():
    train = synthetic_dialogues(300, split="train", seed=0, level=None)
    held = synthetic_dialogues(150, split="heldout", seed=0, level=None)
    train_values = {(e.meta["slot"], c) for e in train for c in e.choices}
    held_values = {(e.meta["slot"], c) for e in held for c in e.choices}
    assert held_values and not (held_values & train_values)
    assert all(value_split(s, v) == "heldout" for s, v in held_values if s != "task")
    assert all(not e.meta["seen_in_training"] for e in held)
    # No held-out value appears anywhere in a training conversation's text either.
    train_text = " ".join(m["content"] for e in train for m in e.history)
    assert not any(f" {v}." in train_text for s, v in held_values if s != "task")


def test_value_pools_are_open():
    import random

    rng = random.Random(0)
    for slot in SLOTS:
        values = {sample_value(slot.name, rng, "train") for _ in range(300)}
        assert len(values) > (60 if slot.name == "appointment" else 120), slot.name


def test_heldout_phrasings_only_in_heldout():
    train = synthetic_dialogues(200, split="train", seed=0, level=None)
    assert all(e.meta["phrasing_seen"] for e in train)
    held = synthetic_dialogues(200, split="heldout", seed=0, level=None)
    assert any(not e.meta["phrasing_seen"] for e in held)


def test_curriculum_levels_rise():
    stages = (0.25, 0.5, 0.75, 1.0)
    levels = [curriculum_level(i, 400, stages) for i in range(400)]
    assert set(levels[:100]) == {0}
    assert max(levels[300:]) == 3 and sum(x == 3 for x in levels[300:]) > 50
    assert curriculum_level(5, 400, ()) == 3


def test_registry_synthetic_and_errors():
    assert {"synthetic", "babi1", "babi2", "babi3", "banking77"} <= set(list_tasks())
    ex = load_task("synthetic", split="test", limit=25, seed=1)
    assert len(ex) == 25 and all(e.meta["split"] == "heldout" for e in ex)
    with pytest.raises(ValueError):
        load_task("nope")


@needs_bench
@pytest.mark.parametrize("task", [1, 2, 3])
def test_babi_loader(task):
    ex = load_task(f"babi{task}", BENCH, split="test", limit=40, seed=0)
    assert len(ex) == 40
    for e in ex:
        assert e.answer in e.choices and 2 <= len(e.choices) <= 4
        assert all(m["role"] == "user" for m in e.history)
        assert e.evidence and e.question.endswith("?")
    assert load_task(f"babi{task}", BENCH, split="test", limit=40, seed=0)[5].choices == ex[5].choices
    train = load_task(f"babi{task}", BENCH, split="train", limit=40)
    assert {e.meta["story"] for e in train}.isdisjoint({e.meta["story"] for e in ex})


@needs_bench
def test_banking77_loader():
    ex = load_task("banking77", BENCH, split="test", limit=12, seed=0, num_classes=6, shots=3)
    again = load_task("banking77", BENCH, split="test", limit=12, seed=0, num_classes=6, shots=3)
    assert [e.question for e in ex] == [e.question for e in again]
    assert len(ex) == 12
    for e in ex:
        assert e.choices == [str(i) for i in range(6)] and e.answer in e.choices
        demos = "\n".join(m["content"] for m in e.history)
        assert demos.count("Label: ") == 18
        assert e.question.split("\n")[0] not in demos  # the query is not among the demonstrations
        assert any(f"Label: {e.answer}" in e.history[j]["content"] for j in e.evidence)
    assert ex[0].history == ex[1].history and ex[0].meta["group"] == ex[1].meta["group"]
