"""End to end: ``deltamem eval conversation`` on a 3-example JSONL with the embedded model."""

from __future__ import annotations

import argparse
import json

import pytest

from deltamem_agents.evaluation.cli_commands import register

EXAMPLES = [
    {"id": "cat", "history": [
        {"role": "user", "content": "My cat is called Whiskers."}, {"role": "assistant", "content": "Nice name!"},
        {"role": "user", "content": "I live in Paris."}, {"role": "assistant", "content": "Paris is lovely."}],
     "question": "What is my cat called?", "answer": "Whiskers", "evidence": [0]},
    {"id": "city", "history": [
        {"role": "user", "content": "My cat is called Whiskers."}, {"role": "assistant", "content": "Nice name!"},
        {"role": "user", "content": "I live in Paris."}, {"role": "assistant", "content": "Paris is lovely."}],
     "question": "Which city do I live in?", "answer": ["Paris"], "choices": ["Paris", "London", "Rome"],
     "evidence": [2]},
    {"id": "colour", "history": [{"role": "user", "content": "My favourite colour is green."}],
     "question": "What is my favourite colour?", "answer": "green"},
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets torch's process-wide thread count; put it back for the other tests."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _eval(argv):
    parser = argparse.ArgumentParser(prog="deltamem")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.mark.embedded
def test_deltamem_eval_conversation_end_to_end(embedded, tmp_path):
    data = tmp_path / "three.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    out = tmp_path / "out"
    argv = [
        "conversation", "--data", str(data), "--limit", "3", "--window-tokens", "24", "--max-new-tokens", "3",
        "--adapter", "untrained", "--threads", "1", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert _eval(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["none", "window", "full", "bm25", "deltamem", "deltamem-online"]
    assert len(results["records"]) == 18
    assert {r["evidence"] for r in results["records"]} == {"outside", "inside", "unknown"}
    assert results["summary"]["splits"]["outside"]["none"]["n"] == 1
    assert "## Cost per arm" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.embedded
def test_adapter_none_skips_memory_arms(embedded, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(EXAMPLES[2]) + "\n")
    out = tmp_path / "out"
    argv = ["conversation", "--data", str(data), "--arms", "none,deltamem", "--adapter", "none",
            "--max-new-tokens", "2", "--threads", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert _eval(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["none"] and results["meta"]["skipped_arms"] == ["deltamem"]


# -- warnings: a requested arm dropped; no question with its evidence outside the window ---------------------------
@pytest.fixture
def loaded_embedded(embedded, monkeypatch):
    """``deltamem eval`` gets the session's embedded model instead of loading it again (no arm here attaches)."""
    monkeypatch.setattr("deltamem_agents.models.load_base_model", lambda *a, **k: embedded)
    return embedded


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.embedded
def test_dropped_arm_is_a_loud_warning(loaded_embedded, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("deltamem_agents.adapter.shipped.shipped_adapter_dir", lambda name=None: None)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(EXAMPLES[0]) + "\n")
    out = tmp_path / "out"
    argv = ["conversation", "--data", str(data), "--arms", "none,deltamem", "--adapter", "default",
            "--max-new-tokens", "2", "--threads", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert _eval(argv) == 0
    warnings = _warnings(capsys.readouterr().err)
    dropped = [w for w in warnings if w.startswith("warning: dropping the requested arm(s) deltamem:")]
    assert len(dropped) == 2  # before the run, and again below the report
    assert "no shipped adapter is installed (--adapter default)" in dropped[0]
    assert "--adapter untrained" in dropped[0]
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["none"] and results["meta"]["skipped_arms"] == ["deltamem"]
    assert any(w.startswith("dropping the requested arm(s) deltamem") for w in results["meta"]["warnings"])
    assert "**warning**: dropping the requested arm(s) deltamem" in (out / "results.md").read_text()


@pytest.mark.embedded
def test_warns_when_no_evidence_lies_outside_the_window(loaded_embedded, tmp_path, capsys):
    data = tmp_path / "three.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")

    def run(*extra: str) -> tuple[str, dict]:
        out = tmp_path / f"out{len(extra)}"
        argv = ["conversation", "--data", str(data), "--arms", "none,window", "--max-new-tokens", "2",
                "--threads", "1", "--out", str(out), "--quiet", *extra]  # fmt: skip
        assert _eval(argv) == 0
        return capsys.readouterr().err, json.loads((out / "results.json").read_text())

    err, results = run()  # the default window (1024 tokens) holds every one of these short histories
    assert "evidence: 0 of 3 questions have it outside the 1024-token window (2 inside, 1 unannotated)" in err
    (warning,) = {w for w in _warnings(err)}
    assert warning.startswith("warning: no question has its evidence outside the 1024-token window")
    assert "δ-mem vs window measures nothing" in warning and "try --window-tokens" in warning
    assert results["meta"]["evidence_outside_window"] == 0
    suggested = int(warning.split("try --window-tokens ")[1].split()[0])

    err, results = run("--window-tokens", str(suggested))  # the suggestion puts at least half outside
    assert _warnings(err) == []
    outside = results["meta"]["evidence_outside_window"]
    assert outside >= 1 and f"evidence: {outside} of 3 questions have it outside" in err
    # the same rule as the runner's: the window arm's records agree
    assert sum(r["evidence"] == "outside" for r in results["records"] if r["arm"] == "window") == outside


@pytest.mark.embedded
def test_evidence_counts_by_the_runners_rule(embedded):
    from deltamem_agents.evaluation.cli_commands import evidence_counts
    from deltamem_agents.evaluation.tasks import EvalTask
    from deltamem_agents.training.examples import MemoryExample

    ex = EXAMPLES[0]
    examples = [MemoryExample(id=ex["id"], task="conversation", history=ex["history"], question=ex["question"], answers=[ex["answer"]],
                              evidence=ex["evidence"])]  # fmt: skip
    task = EvalTask("conversation", examples)
    assert evidence_counts(task, embedded[1], 1024).outside == 0
    counts = evidence_counts(task, embedded[1], 0)  # an empty window: all evidence outside
    assert (counts.outside, counts.inside, counts.unknown, counts.total) == (1, 0, 0, 1)
    limit = counts.suggested_window
    assert evidence_counts(task, embedded[1], limit).outside == 1
    assert evidence_counts(task, embedded[1], limit + 1).outside == 0
