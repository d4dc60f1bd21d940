"""Smoke tests of ``examples/``: each script runs in its own process on the embedded model with a temporary store,
and the "restart" examples are run twice to show that the session carried over."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def store(tmp_path_factory, embedded):  # ``embedded``: skip (or fail under CI) when the model is not fetched
    return f"sqlite:///{tmp_path_factory.mktemp('examples') / 'sessions.db'}"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_coding_assistant_learns_then_applies_after_restart(store):
    out = run("coding_assistant.py", "learn", "--store", store, "--max-new-tokens", "1")
    assert "learned: wrote 9 messages" in out
    out = run("coding_assistant.py", "apply", "--store", store, "--max-new-tokens", "1")
    assert "turn 1, 9 messages" in out  # the state written by the first process was loaded
    assert "[state-only] A:" in out and "follows the conventions" in out
    assert "turn 2, 11 messages" in out
    assert "[no memory] A:" in out


def test_data_analysis_agent_keeps_its_record(store):
    out = run("data_analysis_agent.py", "--store", store, "--max-new-tokens", "1")
    assert "step 4:" in out and "the agent's own record of assumptions" in out
    assert "prompt tokens" in out


def test_langgraph_agent_remembers_across_restarts(store, tmp_path):
    pytest.importorskip("langgraph.checkpoint.sqlite")
    cps = str(tmp_path / "cp.db")
    common = ["--store", store, "--max-new-tokens", "1", "--checkpoints", cps, "--thread", "ex-thread"]
    first = run("langgraph_agent.py", *common, "I write Rust.")
    assert "0 messages in checkpoints" in first and "turn 1" in first
    second = run("langgraph_agent.py", *common, "What do I write?")
    assert "2 messages in checkpoints" in second  # checkpoints survived the restart
    assert "session 'ex-thread': turn 1" in second  # and so did the δ-mem session
    assert "turn 2" in second
    gone = run("langgraph_agent.py", *common, "--delete")
    assert "deleted thread 'ex-thread'" in gone


def test_llamaindex_chat_remembers_across_restarts(store):
    pytest.importorskip("llama_index.llms.deltamem")
    first = run("llamaindex_chat.py", "--store", store, "--max-new-tokens", "1", "I like tea.")
    assert "before: session 'llamaindex-demo': does not exist yet" in first
    second = run("llamaindex_chat.py", "--store", store, "--max-new-tokens", "1", "What do I like?")
    assert "before: session 'llamaindex-demo': turn 1" in second
    assert "after:  session 'llamaindex-demo': turn 2" in second
