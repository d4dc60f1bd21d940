"""Unit tests of the engine's pure parts: messages, window, reconciliation, detokenisation, sampling, serialisation,
and the in-memory store's contract."""

from __future__ import annotations

import pytest
import torch

from deltamem_agents.engine.detokenize import TextAccumulator
from deltamem_agents.engine.errors import InvalidMessageError, InvalidStateError
from deltamem_agents.engine.messages import Message, normalize_messages
from deltamem_agents.engine.sampling import Sampler, SamplingParams
from deltamem_agents.engine.session import plan_turn
from deltamem_agents.engine.window import HistoryItem, select_window
from deltamem_agents.store.base import (
    ConcurrentUpdateError,
    CorruptStateError,
    SessionExistsError,
    SessionNotFoundError,
    TensorBlob,
    TurnInfo,
    WindowMessage,
    WrittenMessage,
)
from deltamem_agents.store.memory import InMemorySessionStore


# ---------------------------------------------------------------------------------------------- messages
def test_messages_validate_and_digest():
    class Obj:
        role, content = "user", "hi"

    class LangChainLike:
        type, content = "human", "hi"

    msgs = normalize_messages([{"role": "user", "content": "hi"}, Obj(), LangChainLike()])
    assert len({m.digest for m in msgs}) == 1
    assert normalize_messages("hello")[0] == Message("user", "hello")
    assert normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}])[0].content == "ab"
    assert normalize_messages([{"role": "assistant", "content": ""}])[0].content == ""  # empty answers are valid
    assert Message("user", "a").digest != Message("assistant", "a").digest
    for bad in ({"role": "wizard", "content": "x"}, {"role": "user", "content": "  "}, {"role": "user"},
                {"role": "user", "content": [{"type": "image_url"}]}, 42):
        with pytest.raises(InvalidMessageError):
            normalize_messages([bad])


def _items(tokens, first_system=True):
    out = []
    for i, n in enumerate(tokens):
        role = "system" if (i == 0 and first_system) else ("user" if i % 2 else "assistant")
        out.append(HistoryItem(i, Message(role, f"m{i}"), n))
    return out


def test_window_pins_system_and_keeps_current_turn():
    items = _items([5, 10, 10, 10, 10])
    assert [i.index for i in select_window(items, 25)] == [0, 3, 4]
    assert [i.index for i in select_window(items, 0, keep_last=1)] == [0, 4]
    assert [i.index for i in select_window(items, 1000)] == [0, 1, 2, 3, 4]
    assert [i.index for i in select_window(_items([10, 10], first_system=False), 5)] == []


def _record(msgs):
    return [WrittenMessage(i, m.role, m.digest, 3) for i, m in enumerate(msgs)]


def test_plan_full_append_and_divergence():
    hist = normalize_messages([{"role": "user", "content": f"u{i}"} if i % 2 == 0 else
                               {"role": "assistant", "content": f"a{i}"} for i in range(6)])
    record = _record(hist[:4])
    turns = [TurnInfo(0, None, 0, 0), TurnInfo(1, None, 2, 0), TurnInfo(2, None, 4, 0)]
    counts = [3] * 6
    p = plan_turn("auto", hist, counts, record, turns, 2, [])
    assert p.style == "full" and [i.index for i in p.new] == [4, 5] and not p.replayed and p.base_turn == 2
    p = plan_turn("auto", hist[:4], counts[:4], record, turns, 2, [])
    assert p.new == [] and not p.replayed  # idempotent resend
    edited = list(hist)
    edited[3] = Message("assistant", "edited")
    p = plan_turn("auto", edited, counts, record, turns, 2, [])  # on_divergence="reject" by default
    assert p.conflict and not p.replayed and p.new == [] and p.diverged_at == 3 and p.committed == 4
    p = plan_turn("auto", edited, counts, record, turns, 2, [], on_divergence="rollback")
    assert p.replayed and p.diverged_at == 3 and p.base_turn == 1 and [i.index for i in p.new] == [2, 3, 4, 5]
    p = plan_turn("auto", hist[:1], counts[:1], record, turns, 2, [], on_divergence="rollback")  # "regenerate"
    assert p.replayed and p.base_turn == 0 and [i.index for i in p.new] == [0]
    window = [WindowMessage(2, "user", "u2", 3), WindowMessage(3, "assistant", "a3", 3)]
    p = plan_turn("auto", [Message("user", "new")], [3], record, turns, 2, window)
    assert p.style == "append" and [i.index for i in p.new] == [4] and [i.index for i in p.history] == [2, 3, 4]
    # an edited first message of a full resend is still recognised as a full history
    edited0 = [Message("user", "changed"), *hist[1:]]
    p = plan_turn("auto", edited0, counts, record, turns, 2, [], on_divergence="rollback")
    assert p.style == "full" and p.diverged_at == 0 and p.base_turn == 0
    assert plan_turn("auto", edited0, counts, record, turns, 2, []).conflict
    # pruned snapshots: replay from nothing
    p = plan_turn("full", edited, counts, record, [TurnInfo(2, None, 4, 0)], 2, [], on_divergence="rollback")
    assert p.base_turn == -1 and len(p.new) == 6


def test_plan_views_of_other_clients_and_trimmed_histories():
    """``auto`` never appends what is already committed: a whole history that does not fit the record is a
    divergence, a trimmed view that ends with the record's end extends it."""
    msg = lambda role, text: Message(role, text)  # noqa: E731
    a1, a2 = msg("user", "A1"), msg("assistant", "rA1")
    b1, b2 = msg("user", "B1"), msg("assistant", "rB1")
    record = _record([a1, a2, b1, b2])
    turns = [TurnInfo(0, None, 0, 0), TurnInfo(1, None, 2, 0), TurnInfo(2, None, 4, 0)]
    window = [WindowMessage(i, m.role, m.content, 3) for i, m in enumerate([a1, a2, b1, b2])]
    # client B resends its own history (it starts inside the session, at index 2, and ends with its end)
    p = plan_turn("auto", [b1, b2, msg("user", "B2")], [3] * 3, record, turns, 2, window)
    assert p.style == "full" and [i.index for i in p.new] == [4] and not p.conflict
    assert [i.index for i in p.history] == [0, 1, 2, 3, 4]  # the window before the view, then the view
    # client A resends its history: it misses B's messages at their position → divergence (never appended)
    p = plan_turn("auto", [a1, a2, msg("user", "A2")], [3] * 3, record, turns, 2, window)
    assert p.conflict and p.diverged_at == 2 and p.committed == 4
    # a history with the system message kept and the middle trimmed extends the record
    sys_ = msg("system", "S")
    rec = _record([sys_, a1, a2, b1, b2])
    p = plan_turn("auto", [sys_, b1, b2, msg("user", "x")], [3] * 4, rec, turns, 2, [])
    assert not p.conflict and [i.index for i in p.new] == [5] and [i.index for i in p.history] == [0, 3, 4, 5]
    # ...but under "full" that is a divergence (the caller's view of the whole conversation lacks 1..2)
    p = plan_turn("full", [sys_, b1, b2, msg("user", "x")], [3] * 4, rec, turns, 2, [])
    assert p.conflict and p.diverged_at == 1
    # a stale trimmed view (another writer appended after it) diverges
    p = plan_turn("auto", [b1, msg("user", "B2")], [3] * 2, record, turns, 2, window)
    assert p.conflict and p.diverged_at == 0
    # a single new message is an append (nothing read), a multi-message call sharing nothing with the record too
    p = plan_turn("auto", [msg("user", "new")], [3], record, turns, 2, window)
    assert p.style == "append" and [i.index for i in p.new] == [4]
    p = plan_turn("auto", [msg("tool", "t"), msg("user", "new")], [3, 3], record, turns, 2, window)
    assert p.style == "append" and [i.index for i in p.new] == [4, 5]


# ---------------------------------------------------------------------------------------------- text
def test_detokenizer_multibyte_and_stop(tokenizer):
    text = "Olá, 世界! 🎉 done STOP tail"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    acc = TextAccumulator(tokenizer)
    pieces = [acc.push(t)[0] for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + acc.finish() == text

    acc = TextAccumulator(tokenizer, stop=[" STOP"])
    out, hit = [], False
    for t in ids:
        d, hit = acc.push(t)
        out.append(d)
        if hit:
            break
    assert hit and "".join(out) == acc.text == "Olá, 世界! 🎉 done"


def test_sampler():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.9])
    assert Sampler(SamplingParams())(logits) == 1
    a = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    b = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert a == b
    top1 = Sampler(SamplingParams(temperature=2.0, top_k=1, seed=1))
    assert all(top1(logits) == 1 for _ in range(20))
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert all(top_p(logits) in (1, 3) for _ in range(50))
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_serialization_roundtrip_and_checks(tiny_dm):
    from deltamem_agents.engine.serialization import blobs_to_state, state_to_blobs

    state = tiny_dm.new_state(1)
    state.memory[0] = torch.randn_like(state.memory[0])
    blobs = state_to_blobs(state)
    assert blobs[0].dtype == "float32" and blobs[0].shape == (2, 1, 1, 8, 8)
    assert blobs_to_state(blobs, tiny_dm).equal(state)
    assert blobs_to_state([], tiny_dm).equal(tiny_dm.new_state(1))
    state.memory[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidStateError):
        blobs_to_state(state_to_blobs(state), tiny_dm)
    with pytest.raises(CorruptStateError):
        blobs_to_state([TensorBlob("memory", "float32", (2, 1, 1, 8, 8), b"\0" * 7)], tiny_dm)
    with pytest.raises(InvalidStateError):
        blobs_to_state([TensorBlob("memory", "float32", (3, 1, 1, 8, 8), b"\0" * (3 * 64 * 4))], tiny_dm)


# ---------------------------------------------------------------------------------------------- memory store
def test_memory_store_contract():
    s = InMemorySessionStore(max_snapshots=3)
    info = s.create("a", model_fingerprint="m", adapter_fingerprint="x")
    assert info.version == 1 and info.turn == 0
    with pytest.raises(SessionExistsError):
        s.create("a", model_fingerprint="m", adapter_fingerprint="x")
    blob = TensorBlob("memory", "float32", (1,), b"\0\0\0\0")
    v = info.version
    for t in range(1, 5):
        v = s.commit("a", expected_version=v, state=[blob], written=[WrittenMessage(t - 1, "user", "d", 2)],
                     window=[]).version
    with pytest.raises(ConcurrentUpdateError):
        s.commit("a", expected_version=v - 1, state=[blob], written=[], window=[])
    assert [t.turn for t in s.list_turns("a")] == [2, 3, 4]  # pruned, the record stays
    assert s.load("a").record.count == 4 and len(s.load("a", turn=2, full_record=True).written) == 2
    with pytest.raises(SessionNotFoundError):
        s.load("a", turn=1)
    with pytest.raises(CorruptStateError):
        s.commit("a", expected_version=v, state=[TensorBlob("memory", "float32", (2,), b"\0")], written=[], window=[])
    assert s.get("a").version == v  # nothing changed
    info = s.commit("a", expected_version=v, state=[], written=[], window=[], base_turn=2)
    assert info.turn == 3 and s.load("a").record.count == 2
    f = s.fork("a", "b", turn=2)
    assert f.turn == 2 and s.load("b").turn == 2
    s.rollback("a", turn=2)
    assert s.get("a").turn == 2
    s.reset("a")
    assert s.load("a").turn == 0 and s.stats("a").turns == 1
    s.delete("a")
    assert not s.exists("a") and [i.session_id for i in s.list_sessions()] == ["b"]
