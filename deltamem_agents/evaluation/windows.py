"""Which messages an arm shows as text, and where the evidence lies relative to the window.

Windows are whole messages: the window of ``W`` tokens holds the longest run of most recent messages whose
rendered token counts sum to at most ``W`` (a message is never cut in half, so a window may hold fewer than
``W`` tokens, and a last message longer than ``W`` leaves it empty). The same rule truncates the ``full`` arm
from the front at the model's context limit.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["EVIDENCE_INSIDE", "EVIDENCE_OUTSIDE", "EVIDENCE_UNKNOWN", "evidence_position", "window_start"]

EVIDENCE_OUTSIDE = "outside"
EVIDENCE_INSIDE = "inside"
EVIDENCE_UNKNOWN = "unknown"


def window_start(lengths: Sequence[int], budget: int) -> int:
    """Index of the first message of the most recent messages that fit in ``budget`` tokens.

    ``len(lengths)`` means the window is empty; ``0`` means everything fits.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    total = 0
    start = len(lengths)
    for i in range(len(lengths) - 1, -1, -1):
        total += lengths[i]
        if total > budget:
            break
        start = i
    return start


def evidence_position(evidence: Sequence[int], start: int) -> str:
    """``"outside"`` when every evidence message precedes the window starting at ``start`` (only the state can
    answer), ``"inside"`` when at least one lies in the window (the window text may suffice), ``"unknown"``
    when the example has no evidence annotation."""
    if not evidence:
        return EVIDENCE_UNKNOWN
    return EVIDENCE_OUTSIDE if all(e < start for e in evidence) else EVIDENCE_INSIDE
