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
            [(i.index, i.message) for i in p.history], p.diverged_at, p.base_tokens, p.base_history, p.conflict)


def _reference_plan(style, messages, record, turns, latest_turn, window, on_divergence):
    """The plain algorithm: compare the call with the whole record, entry by entry (no summary, no chain)."""
    n = len(record)
    digests = [r.digest for r in record]
    calls = [m.digest for m in messages]
    chain = lambda recs: extend_history(EMPTY_CHAIN, [r.digest for r in recs])  # noqa: E731
    latest = (latest_turn, n)
    tokens = sum(r.tokens for r in record)

    def view(keep):
        """Record indexes of a call that keeps record[:keep], skips a middle part and then repeats the record's
        last entries (at least one) before its new messages."""
        for j in range(n - 1, keep, -1):
            if len(calls) - keep >= n - j and calls[keep:keep + n - j] == digests[j:]:
                return list(range(keep)) + [j + i for i in range(len(calls) - keep)]
        return None

    def view_plan(indexes):
        items = list(zip(indexes, messages, strict=True))
        shown = set(indexes)
        history = sorted([(w.index, Message(w.role, w.content)) for w in window if w.index not in shown] + items,
                         key=lambda x: x[0])
        return ("full", *latest, [x for x in items if x[0] >= n], history, None, tokens, chain(record), False)

    requested = style
    if style == "auto":
        if not n or calls[0] == digests[0]:
            style = "full"
        elif len(calls) == 1:
            style = "append"
        elif view(0) is not None:
            return view_plan(view(0))
        elif calls[0] in digests or any(calls[i] == digests[i] for i in range(1, min(len(calls), n))):
            style = "full"
        else:
            style = "append"
    if style == "append":
        new = [(n + i, m) for i, m in enumerate(messages)]
        history = [(w.index, Message(w.role, w.content)) for w in window] + new
        return ("append", *latest, new, history, None, tokens, chain(record), False)
    history = list(enumerate(messages))
    diverged = next((i for i in range(n) if i >= len(calls) or calls[i] != digests[i]), None)
    if diverged is None:
        return ("full", *latest, history[n:], history, None, tokens, chain(record), False)
    if requested == "auto" and diverged and view(diverged) is not None:  # kept the start, trimmed the middle
        return view_plan(view(diverged))
    if on_divergence == "reject":
        return ("full", *latest, [], history, diverged, tokens, chain(record), True)
    candidates = [t for t in turns if t.written_count <= diverged]
    base_turn, base_written = (max(candidates, key=lambda t: t.turn).turn, max(
        candidates, key=lambda t: t.turn).written_count) if candidates else (-1, 0)
    kept = record[:base_written]
    return ("full", base_turn, base_written, history[base_written:], history, diverged,
            sum(r.tokens for r in kept), chain(kept), False)


def _cases(rng: random.Random):
    for n in range(0, 9):
        history = [Message("user" if i % 2 == 0 else "assistant", f"m{i}-{rng.random():.6f}") for i in range(n + 3)]
        record = [WrittenMessage(i, m.role, m.digest, rng.randint(1, 9)) for i, m in enumerate(history[:n])]
        # one snapshot per two records; some runs prune the oldest snapshots
        turns = [TurnInfo(t, None, min(2 * t, n), 0) for t in range((n + 1) // 2 + 1)]
        pruned = turns[len(turns) // 2:] if rng.random() < 0.3 else turns
        other = [Message("user", f"other client {i}") for i in range(3)]
        calls = [history[:n], history[:n + 2], history[: max(0, n - 1)], history[1:n + 1], [history[n]],
                 history[n:n + 2],
                 history[n // 2:n + 1], history[:1] + history[n - 1:n + 2],  # trimmed views of the history
                 history[max(0, n - 2):n - 1] + history[n:n + 1],  # a stale trimmed view
                 other[:2], other[:1] + history[:n], history[:1] + other]  # another client's conversation
        for k in range(n):  # an edit at every position, with and without new messages after it
            edited = list(history[: n + 1])
            edited[k] = Message(edited[k].role, "edited")
            calls += [edited, edited[: k + 1]]
        for call in calls:
            if call:
                for style in ("auto", "full", "append"):
                    for policy in ("reject", "rollback"):
                        yield style, call, record, pruned, policy


def test_summary_plans_equal_full_record_plans():
    rng = random.Random(13)
    checked = loads = conflicts = views = 0
    for style, call, record, turns, policy in _cases(rng):
        counts = [len(m.content) for m in call]
        window = [WindowMessage(r.index, r.role, "w", r.tokens) for r in record[-2:]]
        latest = turns[-1].turn
        reference = _reference_plan(style, call, record, turns, latest, window, policy)
        read = []
        fast = plan_turn(style, call, counts, RecordSummary.of(record), turns, latest, window,
                         full_record=lambda record=record, read=read: read.append(1) or record, on_divergence=policy)
        assert _plan_fields(fast) == reference, (style, call, record, policy)
        assert _plan_fields(plan_turn(style, call, counts, record, turns, latest, window,
                                      on_divergence=policy)) == reference
        # what the summary decides alone reads nothing: appends, single messages under "auto", and a call
        # that repeats the whole record before its new messages
        extends = len(call) >= len(record) and [m.digest for m in call[:len(record)]] == [r.digest for r in record]
        first_differs = bool(record) and call[0].digest != record[0].digest
        if style == "append" or extends or (style == "auto" and len(call) == 1 and first_differs):
            assert not read, (style, call, record)
        loads += bool(read)
        conflicts += fast.conflict
        views += fast.style == "full" and [i.index for i in fast.history] != list(range(len(fast.history)))
        checked += 1
    assert checked > 1000 and loads > 100 and conflicts > 100 and views > 5, (checked, loads, conflicts, views)


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
    result = eng.chat("s", edited, max_new_tokens=3, on_divergence="rollback")
    assert result.replayed and result.rolled_back_to == 0
    assert store.full_loads == 1  # found the divergence with one read of the record
