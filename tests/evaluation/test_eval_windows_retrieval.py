"""Window computation, the evidence split, and BM25 retrieval on a toy conversation."""

from __future__ import annotations

import pytest

from deltamem_agents.evaluation.retrieval import Bm25Index
from deltamem_agents.evaluation.windows import evidence_position, window_start


def test_window_start_whole_messages():
    lengths = [10, 20, 30, 40]
    assert window_start(lengths, 1000) == 0  # everything fits
    assert window_start(lengths, 40) == 3
    assert window_start(lengths, 69) == 3  # 30 + 40 > 69: the window never cuts a message
    assert window_start(lengths, 70) == 2
    assert window_start(lengths, 39) == 4  # empty window
    assert window_start([], 10) == 0
    with pytest.raises(ValueError):
        window_start(lengths, -1)


def test_evidence_position():
    assert evidence_position([0, 1], 2) == "outside"
    assert evidence_position([0, 2], 2) == "inside"  # one evidence message in the window is enough
    assert evidence_position([3], 2) == "inside"
    assert evidence_position([], 2) == "unknown"


TURNS = [
    "Hi there, how are you?",
    "I adopted a dog named Biscuit last week.",
    "The weather has been rainy all month.",
    "I started learning the violin.",
    "We went hiking on Saturday.",
]


def test_bm25_picks_the_right_turn():
    index = Bm25Index(TURNS)
    assert index.select("What is the name of my dog?", [10] * 5, budget=10) == [1]
    assert index.select("Which instrument am I learning?", [10] * 5, budget=10) == [3]


def test_bm25_budget_order_and_k():
    index = Bm25Index(TURNS)
    picked = index.select("dog violin hiking", [10] * 5, budget=100)
    assert picked == [1, 3, 4]  # original order, only messages sharing a term
    assert len(index.select("dog violin hiking", [10] * 5, budget=25)) == 2
    assert len(index.select("dog violin hiking", [10] * 5, budget=100, k=1)) == 1
    assert index.select("dog", [50, 50, 50, 50, 50], budget=49) == []  # nothing fits
    assert index.select("zebra", [10] * 5, budget=100) == []
    assert Bm25Index([]).select("dog", [], 10) == []
