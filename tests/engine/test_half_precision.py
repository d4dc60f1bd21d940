"""The engine on a bf16 base (as on a GPU): the adapter and the state stay float32, the mode invariants hold.

The production configuration is a bf16/fp16 base with the state and memory arithmetic in float32 (issue 12). The
CPU runs bf16 matmuls too, so the engine's logic on such a model is tested here; the kernels' own bf16 tests are
in tests/adapter/test_dtypes.py and tests/ops.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import conversation, make_tiny_dm


@pytest.fixture(scope="module")
def bf16_dm():
    dm = make_tiny_dm(layers=3, seed=5)
    dm.base_model.to(torch.bfloat16)
    return dm


def _turns(eng, sid, n):
    msgs = conversation(1)
    for i in range(n):
        msgs = msgs + [{"role": "user", "content": f"Question {i}: what did I say?"}]
        r = eng.chat(sid, msgs, max_new_tokens=4)
        msgs = msgs + [{"role": "assistant", "content": r.text}]
    return msgs


@pytest.mark.parametrize("mode", ["online", "windowed"])
def test_bf16_base_keeps_a_float32_state_and_the_write_invariant(make_engine, bf16_dm, mode):
    assert next(bf16_dm.base_model.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in bf16_dm.delta_layers.parameters()} == {torch.float32}
    eng = make_engine(dm=bf16_dm, mode=mode)
    msgs = _turns(eng, "s", 3)
    state = eng.session_state("s")
    assert all(m.dtype == torch.float32 for m in state.memory)
    assert state.is_finite() and any(m.abs().sum() > 0 for m in state.memory)
    # the state after the turns is the state of one write of the whole conversation (same forward calls)
    fresh = make_engine(dm=bf16_dm, mode=mode)
    fresh.write("once", msgs)
    assert state.equal(fresh.session_state("once"))


def test_bf16_session_reopened_from_sqlite_continues_bitwise(make_engine, bf16_dm, tmp_path):
    """The float32 state survives the database exactly: a reopened engine continues a stored session like an
    engine that never stored it (windowed mode: the state is a pure fold over the messages)."""
    from deltamem_agents.store import open_store

    url = f"sqlite:///{tmp_path / 'bf16.db'}"
    stored = make_engine(dm=bf16_dm, mode="windowed", store=open_store(url))
    kept = make_engine(dm=bf16_dm, mode="windowed")  # in-memory
    msgs = _turns(stored, "s", 2)
    assert _turns(kept, "s", 2) == msgs
    ask = msgs + [{"role": "user", "content": "Once more?"}]
    reopened = make_engine(dm=bf16_dm, mode="windowed", store=open_store(url))
    r_reopened = reopened.chat("s", ask, max_new_tokens=6)
    r_kept = kept.chat("s", ask, max_new_tokens=6)
    assert r_reopened.text == r_kept.text
    assert reopened.session_state("s").equal(kept.session_state("s"))
