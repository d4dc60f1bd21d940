"""Reconciling the messages of a call with what a session has already written (pure logic, no model).

Frameworks resend the whole history on every call; simple clients send only the new messages. The written
record (one :class:`~deltamem_agents.store.base.WrittenMessage` per history index, with a digest) tells them
apart and makes writes idempotent:

* ``history="full"``: ``messages`` is the whole conversation. Messages whose digest matches the record at their
  index are already written; the rest are new. If a message differs from the record, or the conversation is
  shorter than the record (an edited or removed earlier message, a "regenerate"), the history **diverged** at
  that index: the state goes back to the latest snapshot taken before it and everything from there is written
  again ("replay").
* ``history="append"``: ``messages`` are new messages that follow everything already written.
* ``history="auto"`` (default): ``"full"`` when the record is empty, when the first message matches the record's
  first, or when the call is longer than the record and some later message matches the record at its index;
  otherwise ``"append"``. (An append-style client whose new message equals the session's very first message
  should say ``history="append"``.)

A turn plans from the record's **summary** (:class:`~deltamem_agents.store.base.RecordSummary`: count, tokens,
first digest and the chain of all digests), which the store keeps in the snapshot row: a resent history matches
when the chain of its first ``count`` digests equals the record's, so matching costs no store read however long
the session. The full record is read (``full_record``) only when it is needed: to find where a history
diverged, or for ``"auto"`` when the call is longer than the record and its first message differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..store.base import ConcurrentUpdateError, RecordSummary, TurnInfo, WindowMessage, WrittenMessage
from ..store.digests import EMPTY_CHAIN, extend_history
from .messages import Message
from .window import HistoryItem

__all__ = ["HISTORY_STYLES", "TurnPlan", "plan_turn", "window_items"]

HISTORY_STYLES = ("auto", "full", "append")


@dataclass(frozen=True)
class TurnPlan:
    """What a call must do.

    Attributes:
        style: ``"full"`` or ``"append"`` (after resolving ``"auto"``).
        base_turn: the snapshot to start from (the latest turn unless the history diverged).
        base_written: number of messages written up to ``base_turn``.
        history: the conversation as known after this call's messages (before any reply), each with its
            index; for ``"append"`` the stored window's messages followed by the new ones.
        new: the messages to write (history items with index ≥ ``base_written``), in order.
        diverged_at: the first history index that differs from the record (None: no divergence).
        base_tokens: tokens written for the first ``base_written`` messages.
        base_history: the history chain of the first ``base_written`` messages (what the record's
            ``history_digest`` is once they are written).
    """

    style: str
    base_turn: int
    base_written: int
    history: list[HistoryItem]
    new: list[HistoryItem]
    diverged_at: int | None
    base_tokens: int = 0
    base_history: str = EMPTY_CHAIN

    @property
    def replayed(self) -> bool:
        return self.diverged_at is not None


def resolve_style(style: str, record: RecordSummary, messages: Sequence[Message],
                  full: Callable[[], Sequence[WrittenMessage]]) -> str:
    """``"full"`` or ``"append"`` for ``style`` (see the module docstring); ``full()`` gives the whole record and
    is called only when the summary cannot decide."""
    if style not in HISTORY_STYLES:
        raise ValueError(f"history must be one of {HISTORY_STYLES}, got {style!r}")
    if style != "auto":
        return style
    if not record.count or not messages:
        return "full"
    if messages[0].digest == record.first_digest:
        return "full"
    if len(messages) > record.count:  # the record is shorter than this call: reading it costs no more than the call
        written = full()
        if any(messages[i].digest == written[i].digest for i in range(1, min(len(messages), len(written)))):
            return "full"
    return "append"


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
) -> TurnPlan:
    """Plan a call (see the module docstring).

    Args:
        messages: the call's validated messages; ``token_counts[i]`` the tokens written for ``messages[i]``.
        record: the written record up to ``latest_turn``: its summary (what a load returns), or the full list.
        turns: the kept snapshots (``list_turns``), or a function giving them: it is called only when the
            history diverged (one store query saved per turn).
        full_record: with a summary, a function giving the full record as of ``latest_turn``; called only when
            the history diverged or ``"auto"`` cannot decide from the summary. If what it returns does not match
            the summary (a concurrent writer replaced the turn meanwhile), :class:`ConcurrentUpdateError`.
    """
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

    style = resolve_style(style, summary, messages, full)
    n = summary.count
    if style == "append":
        new = [HistoryItem(n + i, m, c) for i, (m, c) in enumerate(zip(messages, token_counts, strict=True))]
        history = window_items(stored_window) + new
        return TurnPlan("append", latest_turn, n, history, new, None, summary.tokens, summary.history_digest)

    history = [HistoryItem(i, m, c) for i, (m, c) in enumerate(zip(messages, token_counts, strict=True))]
    if len(messages) >= n and extend_history(EMPTY_CHAIN, (m.digest for m in messages[:n])) == summary.history_digest:
        return TurnPlan("full", latest_turn, n, history, history[n:], None, summary.tokens, summary.history_digest)
    written = full()
    diverged = next((i for i, rec in enumerate(written) if i >= len(messages) or messages[i].digest != rec.digest),
                    None)
    if diverged is None:  # defensive: the chains differ, so some digest must
        return TurnPlan("full", latest_turn, n, history, history[n:], None, summary.tokens, summary.history_digest)
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
                    sum(r.tokens for r in kept), extend_history(EMPTY_CHAIN, (r.digest for r in kept)))
