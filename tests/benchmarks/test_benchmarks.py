"""The benchmark harnesses' own logic (figures come from running them, never from tests)."""

from __future__ import annotations

import pytest

from deltamem_agents.benchmarks.conversation import (
    TurnMeasure,
    format_table,
    growth,
    last_over_first,
    run_conversation_benchmark,
    run_resume_benchmark,
    summarize,
    write_json,
)
from deltamem_agents.benchmarks.store_latency import measure_store


def test_store_round_trip_on_a_real_sqlite_file(tmp_path):
    r = measure_store(f"sqlite:///{tmp_path}/s.db", rounds=5, warmup=1)
    assert r.backend == "sqlite" and r.rounds == 5 and r.state_bytes == 30 * 256
    assert 0 < r.median_ms <= r.p99_ms
    assert r.commit_median_ms > 0 and r.load_median_ms > 0


def test_summary_buckets_amortises_and_ratios():
    T = TurnMeasure
    turns = [
        T(0, "online", 300, 1.0, 5.0, kv_cache="new"), T(600, "online", 900, 1.2, 6.0, kv_cache="hot"),
        T(1100, "online", 1400, 1.1, 6.0, kv_cache="hot"), T(1500, "online", 700, 4.0, 9.0, kv_cache="slid"),
        T(1900, "online", 1000, 1.3, 7.0, kv_cache="hot"),
        T(1030, "windowed", 900, 1.0, 10.0, checkpoint=1024), T(1030, "full-context", 1000, 2.0, 50.0, checkpoint=1024),
        T(2050, "windowed", 900, 1.05, 11.0, checkpoint=2048),
        T(2050, "full-context", 2000, 8.0, 200.0, checkpoint=2048),
    ]
    rows = summarize(turns, (1024, 2048))
    assert [r["checkpoint"] for r in rows] == [1024, 2048]
    assert rows[0]["online"]["turns"] == 2 and rows[0]["online"]["latency_s"] == pytest.approx(1.1)
    assert rows[1]["online"]["latency_s"] == pytest.approx(1.2)  # median of the steady turns (1.1, 1.3)
    assert rows[1]["online-amortised"]["latency_s"] == pytest.approx((1.1 + 4.0 + 1.3) / 3)  # slide included
    assert rows[1]["online-reprefills"] == [{"history_tokens": 1500, "latency_s": 4.0, "prompt_tokens": 700}]
    assert rows[1]["full_over_online_amortised"] == pytest.approx(8.0 / ((1.1 + 4.0 + 1.3) / 3))
    assert growth(rows, "full-context") == pytest.approx(4.0)
    assert last_over_first(rows, "windowed") == pytest.approx(1.05)
    table = format_table(rows)
    assert "| 2048 | 3 | 1400 | 1.20 | 2.13 | 4.00 | 9.0 | 1.05 | 11.0 | 2000 | 8.00 | 200.0 | 3.75 |" in table


@pytest.mark.embedded
def test_conversation_harness_runs_every_arm_and_the_resume(embedded, tmp_path):
    """A small run on the embedded model: the harness drives the real engine (structure, not figures)."""
    from deltamem_agents.engine import MemoryEngine
    from deltamem_agents.store.memory import InMemorySessionStore

    engine = MemoryEngine(embedded, adapter="none", store=InMemorySessionStore(), kv_tokens=800, window_tokens=128)
    try:
        results = run_conversation_benchmark(engine, checkpoints=(256, 2048), new_tokens=2, progress=False)
        online = [r for r in results if r.arm == "online"]
        assert online[0].kv_cache == "new" and "hot" in {r.kv_cache for r in online}
        assert "slid" in {r.kv_cache for r in online}  # 2k tokens of conversation through an 800-token budget
        assert all(r.prompt_tokens + 2 <= 800 for r in online)
        assert {r.arm for r in results} == {"online", "windowed", "full-context"}
        rows = summarize(results, (256, 2048))
        assert "online-amortised" in rows[1] and rows[1]["online-reprefills"]
        (m,) = run_resume_benchmark(engine, histories=(300,), new_tokens=2, progress=False)
        assert m.from_disk_kv == "disk" and m.re_prefill_kv == "rebuilt" and m.file_mib > 0
        path = tmp_path / "b.json"
        write_json(results, rows, path, resume=[m])
        assert path.stat().st_size > 0
    finally:
        engine.model.detach_adapter()  # the session-scoped embedded model is shared with other tests


@pytest.mark.embedded
@pytest.mark.slow
def test_training_speed_harness_times_both_trainers(embedded):
    from deltamem_agents.benchmarks.training_speed import run

    res = run(rounds=1, steps=1, threads=1, contexts_per_step=2)
    q = res["questions_per_s"]
    assert q["recipe"] > 0 and q["ladder"] > 0
    assert res["ratio_ladder_over_recipe"] == pytest.approx(q["ladder"] / q["recipe"])
    assert len(res["per_round"]["recipe"]) == len(res["per_round"]["ladder"]) == 1
