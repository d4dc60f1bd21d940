"""The trainer's probe scores answers with the evaluation suite's metrics: one meaning of "exact match"."""

from __future__ import annotations

from deltamem_agents.evaluation import metrics, probe


def test_probe_uses_the_evaluation_metrics():
    assert probe.exact_match is metrics.exact_match
    assert probe.contains_match is metrics.contains_match
    # whole-word matching: the probe's former substring test counted "4" as found in "code 42"
    assert not probe.contains_match("the code is 42", ["4"])
    assert probe.contains_match("The code is 4417.", ["4417"])


def test_probe_summary_uses_the_wilson_interval_of_the_reports():
    summary = probe.summarize([True, False, True, True])
    assert summary["correct"] == 3 and summary["n"] == 4 and summary["acc"] == 0.75
    assert tuple(summary["ci95"]) == metrics.wilson_interval(3, 4)
    assert probe.summarize([])["n"] == 0
