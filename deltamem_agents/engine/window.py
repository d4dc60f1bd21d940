"""The recent window: which messages stay as text in the prompt.

A message is kept whole or not at all. The first message stays pinned when it is a system message (the
instructions of a conversation should not scroll out); the budget counts the other messages. The messages of
the current turn are always kept, even over budget: the model must see what it answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .messages import Message

__all__ = ["HistoryItem", "pinned_system", "select_window"]


@dataclass(frozen=True)
class HistoryItem:
    """A message of the history with its index and its token count (as written)."""

    index: int
    message: Message
    tokens: int


def pinned_system(items: Sequence[HistoryItem]) -> list[HistoryItem]:
    """``[items[0]]`` when it is the conversation's system message (index 0), else ``[]``: the instructions of a
    conversation never scroll out of a prompt (every mode's prompt and the online KV cache use this rule)."""
    return [items[0]] if items and items[0].index == 0 and items[0].message.role == "system" else []


def select_window(items: Sequence[HistoryItem], budget: int, *, keep_last: int = 0) -> list[HistoryItem]:
    """The pinned system message (if ``items[0]`` is one, index 0) plus the most recent messages whose tokens
    add up to at most ``budget``; the last ``keep_last`` items are kept whatever their size."""
    if not items:
        return []
    pinned = pinned_system(items)
    rest = list(items[len(pinned) :])
    kept: list[HistoryItem] = []
    used = 0
    for pos, item in enumerate(reversed(rest)):
        forced = pos < keep_last
        if not forced and used + item.tokens > budget:
            break
        kept.append(item)
        used += item.tokens
    return pinned + kept[::-1]
