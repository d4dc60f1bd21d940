"""Metrics: normalisation, matches, LoCoMo token F1 (with Porter stems and category rules), intervals."""

from __future__ import annotations

import math

import pytest

from deltamem_agents.evaluation.metrics import (
    bootstrap_ci,
    contains_match,
    exact_match,
    label_match,
    locomo_f1,
    locomo_normalize,
    locomo_token_f1,
    match_score,
    mean_ci,
    token_f1,
    wilson_interval,
)
from deltamem_agents.evaluation.porter import stem

# Porter (1980) examples and NLTK's default-mode departures (irregular forms, ies/ied on short words, y → i).
PORTER = {
    "running": "run", "caresses": "caress", "ponies": "poni", "ties": "tie", "cats": "cat", "agreed": "agre",
    "plastered": "plaster", "motoring": "motor", "sing": "sing", "conflated": "conflat", "troubled": "troubl",
    "sized": "size", "hopping": "hop", "falling": "fall", "hissing": "hiss", "filing": "file", "happy": "happi",
    "relational": "relat", "conditional": "condit", "generalization": "gener", "hopeful": "hope",
    "goodness": "good", "adjustment": "adjust", "probate": "probat", "rate": "rate", "cease": "ceas",
    "controll": "control", "roll": "roll", "dying": "die", "skies": "sky", "says": "say", "cry": "cri",
    "studies": "studi", "painting": "paint", "Adoption": "adopt", "is": "is",
}  # fmt: skip


@pytest.mark.parametrize(("word", "expected"), sorted(PORTER.items()))
def test_porter_stems(word, expected):
    assert stem(word) == expected


def test_locomo_normalize_follows_official_rules():
    # commas dropped, lower case, punctuation removed, a/an/the/and removed, spaces collapsed
    assert locomo_normalize("The Cat, and a Dog!") == "cat dog"
    assert locomo_normalize("  An  apple-pie ") == "applepie"


def test_locomo_token_f1_uses_stems():
    assert locomo_token_f1("She was running", "run") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert locomo_token_f1("adoption agencies", "Adoption agency") == 1.0
    assert locomo_token_f1("nothing", "something else") == 0.0


def test_locomo_category_rules():
    # category 1: gold split on commas, each part scored against the best predicted part, averaged
    assert locomo_f1("pottery, camping", "pottery, camping, painting", 1) == pytest.approx(2 / 3)
    # category 3: only the gold text before the first ';' counts
    assert locomo_f1("likely yes", "Likely yes; because she loves it", 3) == 1.0
    # category 5: abstention phrases, and a bare option letter mapped through the answer key
    key = {"a": "Not mentioned in the conversation", "b": "self-care"}
    assert locomo_f1("It is not mentioned.", "x", 5) == 1.0
    assert locomo_f1("No information available", "x", 5) == 1.0
    assert locomo_f1("self-care is important", "x", 5) == 0.0
    assert locomo_f1("(a)", "x", 5, key) == 1.0
    assert locomo_f1("b", "x", 5, key) == 0.0
    # categories 2 and 4: plain stemmed F1
    assert locomo_f1("7 May 2023", "7 May 2023", 2) == 1.0
    with pytest.raises(ValueError):
        locomo_f1("a", "b", 9)


def test_generic_matches():
    assert exact_match("The Kitchen.", ["kitchen"])
    assert not exact_match("the kitchen now", ["kitchen"])
    assert contains_match("Mary is in the kitchen now.", ["kitchen"])
    assert not contains_match("label 42", ["4"])  # whole words only
    assert match_score("It's Whiskers!", ["whiskers", "Tom"]) == 1.0
    assert label_match("Label: 42.", ["42"]) == 1.0
    assert label_match("4 or 42", ["42"]) == 0.0  # the first number is the answer
    assert token_f1("the red car", ["a red bus"]) == pytest.approx(0.5)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    values = [0.0, 0.2, 0.5, 0.9, 1.0, 0.3, 0.7]
    a, b = bootstrap_ci(values, seed=3), bootstrap_ci(values, seed=3)
    assert a == b
    assert a != bootstrap_ci(values, seed=4)
    assert a[0] <= sum(values) / len(values) <= a[1]
    assert mean_ci([1, 0, 1, 1], "accuracy") == wilson_interval(3, 4)
    with pytest.raises(ValueError):
        mean_ci([1.0], "median")
