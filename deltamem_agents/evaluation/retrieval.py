"""BM25 retrieval of past messages (the RAG baseline), with ``bm25s``.

Messages are indexed by their content (not the chat-template markup), lower-cased, English stop words removed
and Porter-stemmed. A question retrieves messages by score; they are taken best first while they fit in the
token budget (skipping one that does not fit, so the budget is used) up to ``k``, and handed back in their
original conversation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..extras import require
from .porter import stem

__all__ = ["Bm25Index"]


def _stem_all(words: list[str]) -> list[str]:
    return [stem(w) for w in words]


class Bm25Index:
    """A BM25 index over the messages of one history."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._bm25s = bm25s = require("bm25s", "eval", "the BM25 RAG baseline")
        self.size = len(texts)
        self._retriever: Any = None
        if self.size == 0:
            return
        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=_stem_all, show_progress=False)
        if not tokens.vocab:
            return
        self._retriever = bm25s.BM25()
        self._retriever.index(tokens, show_progress=False)
        self._vocab = tokens.vocab

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every message for ``query`` (zeros when nothing in the query is indexed)."""
        out = np.zeros(self.size, dtype=np.float64)
        if self._retriever is None:
            return out
        words = self._bm25s.tokenize([query], stopwords="en", stemmer=_stem_all, return_ids=False, show_progress=False)
        known = [w for w in words[0] if w in self._vocab]
        if not known:
            return out
        return np.asarray(self._retriever.get_scores(known), dtype=np.float64)

    def select(self, query: str, lengths: Sequence[int], budget: int, k: int | None = None) -> list[int]:
        """Indices (in original order) of the best-scoring messages that fit in ``budget`` tokens, at most
        ``k`` of them (``None``: as many as fit). Messages that share no term with the query are never taken."""
        scores = self.scores(query)
        order = sorted((i for i in range(self.size) if scores[i] > 0), key=lambda i: (-scores[i], -i))
        chosen: list[int] = []
        used = 0
        for i in order:
            if k is not None and len(chosen) >= k:
                break
            if used + lengths[i] <= budget:
                chosen.append(i)
                used += lengths[i]
        return sorted(chosen)
