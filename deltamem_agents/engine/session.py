"""Reconciling the messages of a call with what a session has already written (pure logic, no model).

Frameworks resend the whole history on every call; simple clients send only the new messages; several clients
may share one session. The written record (one :class:`~deltamem_agents.store.base.WrittenMessage` per history
index, with a digest) tells them apart, makes writes idempotent and finds where a history **diverges**:

* ``history="append"``: ``messages`` are new and follow whatever is committed (a shared log: several appenders
  interleave, nothing is lost).
* ``history="full"``: ``messages`` is the caller's view of the whole conversation. If the record is a prefix of
  it, the rest is new; if they are equal, nothing is new. Otherwise the history **diverged** at the first index
  where the record holds a message the call does not have there (an edited or removed message, a "regenerate",
  or another writer that appended after the caller's last view). What then happens is ``on_divergence``:

  - ``"reject"`` (the default): the plan is a conflict (:attr:`TurnPlan.conflict`; the engine raises
    :class:`~deltamem_agents.engine.errors.HistoryConflictError` before generating anything);
  - ``"rollback"``: the state goes back to the latest snapshot taken before the divergence and everything from
    there is written again ("replay").

* ``history="auto"`` (default): a guess, never a duplicate.

  - ``"full"`` when the record is empty or the call's first message is the record's first;
  - a single message that is not the record's first: ``"append"`` (read nothing);
  - several messages (the record is read once): a **view** — the call keeps the start and/or the end of the
    conversation and leaves out a middle part (a client that trims its history), and ends with exactly what
    the record ends with, plus new messages — extends the session (only the new messages are written); a
    call that otherwise overlaps the record (its first message was committed, or a later one is committed at
    its own index: a resent history that does not fit) is treated as ``"full"``, so it diverges; a call that
    shares nothing with the record is ``"append"``. A call whose first message matches the record's first is
    checked for such a view before it counts as diverged.

A turn plans from the record's **summary** (:class:`~deltamem_agents.store.base.RecordSummary`: count, tokens,
first digest and the chain of all digests), which the store keeps in the snapshot row: a resent history matches
when the chain of its first ``count`` digests equals the record's, so matching costs no store read however long
the session. The full record is read (``full_record``) only when it is needed: to find where a history
diverged, or for ``"auto"`` with several messages whose first is not the record's first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..store.base import ConcurrentUpdateError, RecordSummary, TurnInfo, WindowMessage, WrittenMessage
from ..store.digests import EMPTY_CHAIN, extend_history
from .messages import Message
from .window import HistoryItem

__all__ = ["DIVERGENCE_POLICIES", "HISTORY_STYLES", "TurnPlan", "plan_turn", "window_items"]

HISTORY_STYLES = ("auto", "full", "append")
DIVERGENCE_POLICIES = ("reject", "rollback")


@dataclass(frozen=True)
class TurnPlan:
    """What a call must do.

    Attributes:
        style: ``"full"`` or ``"append"`` (after resolving ``"auto"``; a view is ``"full"``).
        base_turn: the snapshot to start from (the latest turn unless the history diverged).
        base_written: number of messages written up to ``base_turn``.
        history: the conversation as known after this call's messages (before any reply), each with its
            index; for ``"append"`` the stored window's messages followed by the new ones; for a view, the
            stored window's messages before the view's first, then the view's.
        new: the messages to write (history items with index ≥ ``base_written``), in order.
        diverged_at: the first history index where the record holds a message the call does not have there
            (None: no divergence) — the number of committed messages the call agrees with.
        base_tokens: tokens written for the first ``base_written`` messages.
        base_history: the history chain of the first ``base_written`` messages (what the record's
            ``history_digest`` is once they are written).
        committed: messages in the record when the call was planned.
        conflict: the history diverged and ``on_divergence="reject"``: nothing may be generated or written
            (``new`` is empty).
    """

    style: str
    base_turn: int
    base_written: int
    history: list[HistoryItem]
    new: list[HistoryItem]
    diverged_at: int | None
    base_tokens: int = 0
    base_history: str = EMPTY_CHAIN
    committed: int = 0
    conflict: bool = False

    @property
    def replayed(self) -> bool:
        """The state goes back to an earlier snapshot and the history is written again from there."""
        return self.diverged_at is not None and not self.conflict


@dataclass(frozen=True)
class _Resolved:
    """How a call lines up with the record: ``style`` ``"full"``/``"append"``; for a view, ``view`` maps the
    call's positions to record indexes (``None``: position ``i`` is index ``i``)."""

    style: str
    view: tuple[int, ...] | None = None


def _prefix(messages: Sequence[Message], written: Sequence[WrittenMessage]) -> int:
    """How many leading messages equal the record's leading entries."""
    k = 0
    for m, r in zip(messages, written, strict=False):
        if m.digest != r.digest:
            break
        k += 1
    return k


def _view(messages: Sequence[Message], written: Sequence[WrittenMessage], keep: int) -> tuple[int, ...] | None:
    """A view that keeps the record's first ``keep`` entries, leaves out a middle part and then continues with
    exactly the record's last entries (at least one), followed by new messages: the record index of every
    call position, or ``None`` when the call is not such a view."""
    n = len(written)
    if keep >= len(messages) or keep >= n:
        return None
    first = messages[keep].digest
    for j in range(n - 1, keep, -1):  # the latest occurrence first: the longest tail to match is the shortest
        if written[j].digest != first:
            continue
        tail = n - j
        if len(messages) - keep >= tail and all(
            messages[keep + i].digest == written[j + i].digest for i in range(tail)
        ):
            return tuple(range(keep)) + tuple(j + i for i in range(len(messages) - keep))
    return None


def _resolve(style: str, record: RecordSummary, messages: Sequence[Message],
             full: Callable[[], Sequence[WrittenMessage]]) -> _Resolved:
    """How ``style`` applies to this call (see the module docstring); ``full()`` gives the whole record and
    is called only when the summary cannot decide."""
    if style not in HISTORY_STYLES:
        raise ValueError(f"history must be one of {HISTORY_STYLES}, got {style!r}")
    if style != "auto":
        return _Resolved(style)
    if not record.count or not messages or messages[0].digest == record.first_digest:
        return _Resolved("full")
    if len(messages) == 1:
        return _Resolved("append")
    written = full()
    view = _view(messages, written, 0)
    if view is not None:
        return _Resolved("full", view)
    if any(r.digest == messages[0].digest for r in written) or any(
        messages[i].digest == written[i].digest for i in range(1, min(len(messages), len(written)))
    ):
        return _Resolved("full")  # a resent history that does not fit the record: it diverges
    return _Resolved("append")


def window_items(window: Sequence[WindowMessage], record: Sequence[WrittenMessage] | RecordSummary | None = None
                 ) -> list[HistoryItem]:
    """The stored window as history items (roles and contents as stored; optional fields are not kept)."""
    return [HistoryItem(w.index, Message(w.role, w.content), w.tokens) for w in window]


def plan_turn(
    style: str,
    messages: Sequence[Message],
    token_counts: Sequence[int],
    record: RecordSummary | Sequence[WrittenMessage],
    turns: Sequence[TurnInfo] | Callable[[], Sequence[TurnInfo]],
    latest_turn: int,
    stored_window: Sequence[WindowMessage],
    *,
    full_record: Callable[[], Sequence[WrittenMessage]] | None = None,
    on_divergence: str = "reject",
) -> TurnPlan:
    """Plan a call (see the module docstring).

    Args:
        messages: the call's validated messages; ``token_counts[i]`` the tokens written for ``messages[i]``.
        record: the written record up to ``latest_turn``: its summary (what a load returns), or the full list.
        turns: the kept snapshots (``list_turns``), or a function giving them: it is called only when the
            history diverged and is rolled back (one store query saved per turn).
        full_record: with a summary, a function giving the full record as of ``latest_turn``; called only when
            the history diverged or ``"auto"`` cannot decide from the summary. If what it returns does not match
            the summary (a concurrent writer replaced the turn meanwhile), :class:`ConcurrentUpdateError`.
        on_divergence: ``"reject"`` (a diverging history gives a plan with ``conflict=True``) or
            ``"rollback"`` (it gives a replay plan).
    """
    if on_divergence not in DIVERGENCE_POLICIES:
        raise ValueError(f"on_divergence must be one of {DIVERGENCE_POLICIES}, got {on_divergence!r}")
    if isinstance(record, RecordSummary):
        summary, loaded = record, None
    else:
        loaded = list(record)
        summary = RecordSummary.of(loaded)

    def full() -> list[WrittenMessage]:
        nonlocal loaded
        if loaded is None:
            if full_record is None:
                raise TypeError("plan_turn was given a record summary without full_record=")
            loaded = list(full_record())
            if RecordSummary.of(loaded) != summary:
                raise ConcurrentUpdateError(
                    "the session's written record changed while this call was being planned: retry the call"
                )
        return loaded

    requested = style
    resolved = _resolve(style, summary, messages, full)
    n = summary.count
    latest = dict(base_turn=latest_turn, base_written=n, base_tokens=summary.tokens,
                  base_history=summary.history_digest, committed=n)
    if resolved.style == "append":
        new = [HistoryItem(n + i, m, c) for i, (m, c) in enumerate(zip(messages, token_counts, strict=True))]
        return TurnPlan("append", history=window_items(stored_window) + new, new=new, diverged_at=None, **latest)

    if resolved.view is not None:
        return _view_plan(resolved.view, messages, token_counts, stored_window, latest)
    history = [HistoryItem(i, m, c) for i, (m, c) in enumerate(zip(messages, token_counts, strict=True))]
    if len(messages) >= n and extend_history(EMPTY_CHAIN, (m.digest for m in messages[:n])) == summary.history_digest:
        return TurnPlan("full", history=history, new=history[n:], diverged_at=None, **latest)
    written = full()
    diverged = _prefix(messages, written)
    if diverged == n:  # defensive: the chains differ, so some digest must
        return TurnPlan("full", history=history, new=history[n:], diverged_at=None, **latest)
    if requested == "auto" and diverged:  # the start matches: maybe a view that leaves out a middle part
        view = _view(messages, written, diverged)
        if view is not None:
            return _view_plan(view, messages, token_counts, stored_window, latest)
    if on_divergence == "reject":
        return TurnPlan("full", history=history, new=[], diverged_at=diverged, conflict=True, **latest)
    # Latest kept snapshot that holds only messages before the divergence.
    if callable(turns):
        turns = turns()
    candidates = [t for t in turns if t.written_count <= diverged]
    if candidates:
        base = max(candidates, key=lambda t: t.turn)
        base_turn, base_written = base.turn, base.written_count
    else:  # every snapshot that old was pruned: replay from nothing (see MemoryEngine: reset, then replay)
        base_turn, base_written = -1, 0
    kept = written[:base_written]
    return TurnPlan("full", base_turn, base_written, history, history[base_written:], diverged,
                    sum(r.tokens for r in kept), extend_history(EMPTY_CHAIN, (r.digest for r in kept)), n)


def _view_plan(view: tuple[int, ...], messages: Sequence[Message], token_counts: Sequence[int],
               stored_window: Sequence[WindowMessage], latest: dict) -> TurnPlan:
    """A view that extends the record: its positions at their record indexes (new ones after the record); the
    prompt's earlier history is the stored window's messages missing from the view, then the view."""
    items = [HistoryItem(index, m, c) for index, m, c in zip(view, messages, token_counts, strict=True)]
    shown = set(view)
    before = [w for w in window_items(stored_window) if w.index not in shown]
    history = sorted(before + items, key=lambda h: h.index)
    n = latest["base_written"]
    return TurnPlan("full", history=history, new=[h for h in items if h.index >= n], diverged_at=None, **latest)
