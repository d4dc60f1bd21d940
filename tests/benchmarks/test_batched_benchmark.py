"""The batched-decode benchmark harness runs both arms and both measures (figures come from running it, never
from tests)."""

from __future__ import annotations

import json

import pytest

from deltamem_agents.benchmarks.batched_decode import (
    format_table,
    make_tiny_pair,
    run_batched_benchmark,
    write_json,
)


def test_batched_harness_runs_both_measures(tmp_path):
    from transformers import AutoTokenizer

    from deltamem_agents.models import embedded_model_dir

    if not (embedded_model_dir() / "tokenizer_config.json").is_file():
        pytest.skip("embedded model not fetched (run `deltamem model fetch`)")
    pair = make_tiny_pair(AutoTokenizer.from_pretrained(embedded_model_dir()))
    results = run_batched_benchmark(pair, sessions=(1, 3), new_tokens=4, rounds=1, warmup=0, progress=False)
    assert [(r.measure, r.sessions) for r in results] == [("decode", 1), ("decode", 3), ("engine", 1), ("engine", 3)]
    decode3, engine3 = results[1], results[3]
    assert decode3.tokens == 12 and decode3.mean_rows == 3.0  # every decode step batched all three rows
    assert 0 < engine3.tokens <= 12 and 1.0 <= engine3.mean_rows <= 3.0  # EOS may end a session early
    assert all(r.alone_tok_s > 0 and r.batched_tok_s > 0 and len(r.alone_rounds) == 1 for r in results)
    assert "| engine | 3 |" in format_table(results)
    write_json(results, tmp_path / "b.json", model="tiny")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["model"] == "tiny" and len(data["results"]) == 4 and "ratio" in data["results"][0]
