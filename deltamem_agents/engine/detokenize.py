"""Incremental detokenisation with stop strings, for streaming.

Byte-level BPE tokens do not map one-to-one to characters: a multi-byte character can span tokens, and the
decoder shows an incomplete one as ``U+FFFD``. We decode the whole generated sequence at every step and release
only text that is final: not ending in an incomplete character, and not a possible beginning of a stop string
(``"\\n\\nUser"`` must not leak ``"\\n\\n"`` before we know). Decoding the whole sequence is O(n) per step, which is
nothing next to a model forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextAccumulator"]

_REPLACEMENT = "\ufffd"


class TextAccumulator:
    """Collects generated ids and hands out text deltas; finds stop strings.

    ``push(token)`` returns the new safe text (possibly ``""``) and whether a stop string was hit; after a hit
    the text is final (cut before the stop string) and later pushes are ignored.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False
        self._text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(token)
        self._text = self._decode()
        cut = self._first_stop(self._text)
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            return self._release(self._text), True
        safe = self._text
        if safe.endswith(_REPLACEMENT):  # an incomplete multi-byte character: wait for its other bytes
            safe = safe.rstrip(_REPLACEMENT)
        safe = safe[: len(safe) - self._held_back(safe)]
        return self._release(safe), False

    def finish(self) -> str:
        """The rest of the text at the end of generation (held-back text that turned out not to be a stop)."""
        return self._release(self._text)

    @property
    def text(self) -> str:
        return self._text

    def _first_stop(self, text: str) -> int | None:
        # A stop string can only newly appear near the end; search from where it could start.
        start = max(0, len(self.emitted) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, text: str) -> str:
        if len(text) <= len(self.emitted):
            return ""
        if not text.startswith(self.emitted):
            # The decoder revised earlier text (rare normalisation); release only what is new past the common part.
            common = 0
            for a, b in zip(text, self.emitted, strict=False):
                if a != b:
                    break
                common += 1
            delta = text[max(common, len(self.emitted)) :]
        else:
            delta = text[len(self.emitted) :]
        self.emitted = text
        return delta
