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
