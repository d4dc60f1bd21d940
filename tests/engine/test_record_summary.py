"""A turn plans from the record's summary (count, tokens, first digest, chain) instead of reading the record.

The summary path is checked against the plain reference (planning from the full record list) on many histories
— resends, new messages, edits at every position, regenerates, append-style calls, pruned snapshots — and the
engine is checked to read the full record only when a history diverges."""

from __future__ import annotations

import random

import pytest

from deltamem_agents.engine.messages import Message
from deltamem_agents.engine.session import plan_turn
from deltamem_agents.store import RecordSummary, TurnInfo, WindowMessage, WrittenMessage
from deltamem_agents.store.digests import EMPTY_CHAIN, extend_history
from deltamem_agents.store.memory import InMemorySessionStore


def _plan_fields(p):
    return (p.style, p.base_turn, p.base_written, [(i.index, i.message) for i in p.new],
            [(i.index, i.message) for i in p.history], p.diverged_at, p.base_tokens, p.base_history)


def _reference_plan(style, messages, record, turns, latest_turn, window):
    """The plain algorithm (as before summaries): compare every message with the record, entry by entry."""
    if style == "auto":
        if not record or not messages or messages[0].digest == record[0].digest:
            style = "full"
        elif len(messages) > len(record) and any(
                messages[i].digest == record[i].digest for i in range(1, min(len(messages), len(record)))):
            style = "full"
        else:
            style = "append"
    chain = lambda recs: extend_history(EMPTY_CHAIN, [r.digest for r in recs])  # noqa: E731
    if style == "append":
        n = len(record)
        new = [(n + i, m) for i, m in enumerate(messages)]
        history = [(w.index, Message(w.role, w.content)) for w in window] + new
        return ("append", latest_turn, n, new, history, None, sum(r.tokens for r in record), chain(record))
    history = list(enumerate(messages))
    diverged = next((i for i, r in enumerate(record) if i >= len(messages) or messages[i].digest != r.digest), None)
    if diverged is None:
        return ("full", latest_turn, len(record), history[len(record):], history, None,
                sum(r.tokens for r in record), chain(record))
    candidates = [t for t in turns if t.written_count <= diverged]
    base_turn, base_written = (max(candidates, key=lambda t: t.turn).turn, max(
        candidates, key=lambda t: t.turn).written_count) if candidates else (-1, 0)
    kept = record[:base_written]
    return ("full", base_turn, base_written, history[base_written:], history, diverged,
            sum(r.tokens for r in kept), chain(kept))


def _cases(rng: random.Random):
    for n in range(0, 9):
        history = [Message("user" if i % 2 == 0 else "assistant", f"m{i}-{rng.random():.6f}") for i in range(n + 3)]
        record = [WrittenMessage(i, m.role, m.digest, rng.randint(1, 9)) for i, m in enumerate(history[:n])]
        # one snapshot per two records; some runs prune the oldest snapshots
        turns = [TurnInfo(t, None, min(2 * t, n), 0) for t in range((n + 1) // 2 + 1)]
        pruned = turns[len(turns) // 2:] if rng.random() < 0.3 else turns
        calls = [history[:n], history[:n + 2], history[: max(0, n - 1)], history[1:n + 1], [history[n]],
                 history[n:n + 2]]
        for k in range(n):  # an edit at every position, with and without new messages after it
            edited = list(history[: n + 1])
            edited[k] = Message(edited[k].role, "edited")
            calls += [edited, edited[: k + 1]]
        for call in calls:
            if call:
                for style in ("auto", "full", "append"):
                    yield style, call, record, pruned


def test_summary_plans_equal_full_record_plans():
    rng = random.Random(13)
    checked = loads = 0
    for style, call, record, turns in _cases(rng):
        counts = [len(m.content) for m in call]
        window = [WindowMessage(r.index, r.role, "w", r.tokens) for r in record[-2:]]
        latest = turns[-1].turn
        reference = _reference_plan(style, call, record, turns, latest, window)
        read = []
        fast = plan_turn(style, call, counts, RecordSummary.of(record), turns, latest, window,
                         full_record=lambda record=record, read=read: read.append(1) or record)
        assert _plan_fields(fast) == reference, (style, call, record)
        assert _plan_fields(plan_turn(style, call, counts, record, turns, latest, window)) == reference
        if fast.style == "append" or not fast.replayed:
            # no divergence: the record was read only for "auto" when the call is longer than the record
            assert not read or (style == "auto" and len(call) > len(record))
        loads += bool(read)
        checked += 1
    assert checked > 300 and loads > 30


def test_a_summary_without_a_way_to_read_the_record_is_an_error():
    record = [WrittenMessage(0, "user", Message("user", "a").digest, 1)]
    with pytest.raises(TypeError, match="full_record"):
        plan_turn("full", [Message("user", "b")], [1], RecordSummary.of(record), [TurnInfo(0, None, 0, 0)], 1, [])


class CountingStore(InMemorySessionStore):
    def __init__(self) -> None:
        super().__init__()
        self.full_loads = 0

    def load(self, *args, full_record: bool = False, **kwargs):
        self.full_loads += full_record
        return super().load(*args, full_record=full_record, **kwargs)


@pytest.mark.parametrize("mode", ["online", "windowed"])
def test_turns_read_the_record_only_when_a_history_diverges(make_engine, mode):
    store = CountingStore()
    eng = make_engine(store=store, mode=mode)
    history: list = [{"role": "system", "content": "You remember."}]
    for k in range(4):  # a framework resending the whole history every turn
        history.append({"role": "user", "content": f"fact number {k} is {k * 7}"})
        reply = eng.chat("s", history, max_new_tokens=3)
        assert not reply.replayed and reply.written_messages == (3 if k == 0 else 2)
        if mode == "online" and k:
            assert reply.kv_cache == "hot"  # the cache matched the record by its chain, without reading it
        history.append({"role": "assistant", "content": reply.text})
    assert eng.write("s", history).written_messages == 0  # an idempotent resend
    eng.chat("s", [{"role": "user", "content": "and a client sending only new messages"}], history="append",
             max_new_tokens=3)
    assert store.full_loads == 0
    edited = [dict(m) for m in history[:4]]
    edited[1]["content"] = "an edited earlier message"
    result = eng.chat("s", edited, max_new_tokens=3)
    assert result.replayed and result.rolled_back_to == 0
    assert store.full_loads == 1  # found the divergence with one read of the record
