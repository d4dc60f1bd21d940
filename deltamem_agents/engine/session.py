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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..store.base import TurnInfo, WindowMessage, WrittenMessage
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
    """

    style: str
    base_turn: int
    base_written: int
    history: list[HistoryItem]
    new: list[HistoryItem]
    diverged_at: int | None

    @property
    def replayed(self) -> bool:
        return self.diverged_at is not None


def resolve_style(style: str, record: Sequence[WrittenMessage], messages: Sequence[Message]) -> str:
    if style not in HISTORY_STYLES:
        raise ValueError(f"history must be one of {HISTORY_STYLES}, got {style!r}")
    if style != "auto":
        return style
    if not record or not messages:
        return "full"
    if messages[0].digest == record[0].digest:
        return "full"
    if len(messages) > len(record) and any(
        messages[i].digest == record[i].digest for i in range(1, min(len(messages), len(record)))
    ):
        return "full"
    return "append"


def window_items(window: Sequence[WindowMessage], record: Sequence[WrittenMessage]) -> list[HistoryItem]:
    """The stored window as history items (roles and contents as stored; optional fields are not kept)."""
    return [HistoryItem(w.index, Message(w.role, w.content), w.tokens) for w in window]


def plan_turn(
    style: str,
    messages: Sequence[Message],
    token_counts: Sequence[int],
    record: Sequence[WrittenMessage],
    turns: Sequence[TurnInfo] | Callable[[], Sequence[TurnInfo]],
    latest_turn: int,
    stored_window: Sequence[WindowMessage],
) -> TurnPlan:
    """Plan a call (see the module docstring).

    Args:
        messages: the call's validated messages; ``token_counts[i]`` the tokens written for ``messages[i]``.
        record: the written record up to ``latest_turn``; ``turns`` the kept snapshots (``list_turns``), or a
            function giving them: it is called only when the history diverged (one store query saved per turn).
    """
    style = resolve_style(style, record, messages)
    if style == "append":
        start = len(record)
        new = [HistoryItem(start + i, m, n) for i, (m, n) in enumerate(zip(messages, token_counts, strict=True))]
        history = window_items(stored_window, record) + new
        return TurnPlan("append", latest_turn, len(record), history, new, None)

    history = [HistoryItem(i, m, n) for i, (m, n) in enumerate(zip(messages, token_counts, strict=True))]
    diverged = None
    for i, rec in enumerate(record):
        if i >= len(messages) or messages[i].digest != rec.digest:
            diverged = i
            break
    if diverged is None:
        return TurnPlan("full", latest_turn, len(record), history, history[len(record) :], None)
    # Latest kept snapshot that holds only messages before the divergence.
    if callable(turns):
        turns = turns()
    candidates = [t for t in turns if t.written_count <= diverged]
    if candidates:
        base = max(candidates, key=lambda t: t.turn)
        base_turn, base_written = base.turn, base.written_count
    else:  # every snapshot that old was pruned: replay from nothing (see MemoryEngine: reset, then replay)
        base_turn, base_written = -1, 0
    return TurnPlan("full", base_turn, base_written, history, history[base_written:], diverged)
