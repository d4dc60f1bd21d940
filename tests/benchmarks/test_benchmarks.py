"""The benchmark harnesses' own logic (figures come from running them, never from tests)."""

from __future__ import annotations

import pytest

from deltamem_agents.benchmarks.conversation import TurnMeasure, flatness, format_table, summarize
from deltamem_agents.benchmarks.store_latency import measure_store


def test_store_round_trip_on_a_real_sqlite_file(tmp_path):
    r = measure_store(f"sqlite:///{tmp_path}/s.db", rounds=5, warmup=1)
    assert r.backend == "sqlite" and r.rounds == 5 and r.state_bytes == 30 * 256
    assert 0 < r.median_ms <= r.p99_ms
    assert r.commit_median_ms > 0 and r.load_median_ms > 0


def test_summary_ratios_and_flatness():
    turns = [
        TurnMeasure(1000, "deltamem-windowed", 900, 1.0, 10.0),
        TurnMeasure(1000, "full-context", 1000, 2.0, 50.0),
        TurnMeasure(4000, "deltamem-windowed", 900, 1.05, 11.0),
        TurnMeasure(4000, "full-context", 4000, 8.0, 200.0),
    ]
    rows = summarize(turns)
    assert [r["history_tokens"] for r in rows] == [1000, 4000]
    assert rows[1]["latency_ratio_full_over_windowed"] == pytest.approx(8.0 / 1.05)
    assert flatness(rows) == pytest.approx(1.05)
    table = format_table(rows)
    assert "| 4000 | 900 | 1.05 | 11.0 | 4000 | 8.00 | 200.0 | 7.62 |" in table


@pytest.mark.embedded
@pytest.mark.slow
def test_training_speed_harness_times_both_trainers(embedded):
    from deltamem_agents.benchmarks.training_speed import run

    res = run(rounds=1, steps=1, threads=1, contexts_per_step=2)
    q = res["questions_per_s"]
    assert q["recipe"] > 0 and q["ladder"] > 0
    assert res["ratio_ladder_over_recipe"] == pytest.approx(q["ladder"] / q["recipe"])
    assert len(res["per_round"]["recipe"]) == len(res["per_round"]["ladder"]) == 1
