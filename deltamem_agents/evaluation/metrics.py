"""Scoring: answer normalisation, exact / contains match, label match, token F1 (LoCoMo rules), and
confidence intervals (Wilson for accuracies, a seeded percentile bootstrap for F1-like means).

The LoCoMo functions follow the official scorer (snap-research/locomo ``task_eval/evaluation.py``):
``normalize_answer`` drops commas, lower-cases, removes punctuation and the words a/an/the/and and collapses
spaces; tokens are Porter-stemmed (:mod:`.porter`); category 1 (multi-hop) splits prediction and gold on commas
and averages, over the gold parts, the best partial F1 against any predicted part; category 3 keeps the gold
text before the first ``;``; category 5 (adversarial) scores 1 when the answer says "no information available"
or "not mentioned".
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .porter import stem

__all__ = [
    "bootstrap_ci",
    "contains_match",
    "exact_match",
    "label_match",
    "locomo_f1",
    "locomo_normalize",
    "locomo_token_f1",
    "match_score",
    "mean_ci",
    "normalize_text",
    "resolve_choice_letter",
    "token_f1",
    "wilson_interval",
]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LOCOMO_STOPWORDS = re.compile(r"\b(a|an|the|and)\b")


# -- generic normalisation and matches ----------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: NFKC, lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The normalised prediction equals one of the normalised accepted answers."""
    pred = normalize_text(prediction)
    return any(pred == normalize_text(a) for a in answers)


def contains_match(prediction: str, answers: Sequence[str]) -> bool:
    """An accepted answer appears in the prediction as a whole-word span (after normalisation).

    Whole words, so that the answer "4" is not found in "42" nor "cat" in "category"; an answer that normalises
    to nothing never matches.
    """
    pred = normalize_text(prediction).split()
    for answer in answers:
        gold = normalize_text(answer).split()
        if gold and any(pred[i : i + len(gold)] == gold for i in range(len(pred) - len(gold) + 1)):
            return True
    return False


def match_score(prediction: str, answers: Sequence[str]) -> float:
    """1.0 for an exact or whole-word contains match, else 0.0 (the default score of generated answers)."""
    return float(exact_match(prediction, answers) or contains_match(prediction, answers))


_NUMBER = re.compile(r"-?\d+")


def label_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the first integer in the prediction is an accepted label (BANKING77 test-time learning).

    Falls back to exact match when the accepted answers are not integers.
    """
    found = _NUMBER.search(prediction)
    if found is None:
        return float(exact_match(prediction, answers))
    return float(any(found.group() == str(a).strip() for a in answers) or exact_match(prediction, answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 (no stemming), best over the accepted answers."""

    def f1(pred: list[str], gold: list[str]) -> float:
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            return 0.0
        p, r = common / len(pred), common / len(gold)
        return 2 * p * r / (p + r)

    pred = normalize_text(prediction).split()
    return max(f1(pred, normalize_text(a).split()) for a in answers)


# -- LoCoMo ----------------------------------------------------------------------------------------------------
def locomo_normalize(text: str) -> str:
    """``normalize_answer`` of the official LoCoMo scorer."""
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _LOCOMO_STOPWORDS.sub(" ", text)
    return " ".join(text.split())


def locomo_token_f1(prediction: str, gold: str) -> float:
    """``f1_score`` of the official scorer: token F1 over Porter stems of the normalised texts."""
    pred = [stem(w) for w in locomo_normalize(prediction).split()]
    ref = [stem(w) for w in locomo_normalize(gold).split()]
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


_ABSTAIN = ("no information available", "not mentioned")


def resolve_choice_letter(prediction: str, answer_key: dict[str, str] | None) -> str:
    """Map a bare "(a)" / "b" reply to the option text, as the official evaluation does for category 5."""
    if not answer_key:
        return prediction
    pred = prediction.strip().lower()
    if len(pred) == 1:
        return answer_key.get("a" if "a" in pred else "b", prediction)
    if "(a)" in pred:
        return answer_key.get("a", prediction)
    if "(b)" in pred:
        return answer_key.get("b", prediction)
    return prediction


def locomo_f1(prediction: str, gold: str, category: int, answer_key: dict[str, str] | None = None) -> float:
    """Score one LoCoMo answer by the official rules for its category (1–5)."""
    if category == 5:
        text = resolve_choice_letter(prediction, answer_key).lower()
        return float(any(phrase in text for phrase in _ABSTAIN))
    gold = str(gold)
    if category == 3:
        gold = gold.split(";")[0].strip()
    if category == 1:
        preds = [p.strip() for p in prediction.split(",")]
        golds = [g.strip() for g in gold.split(",")]
        return float(np.mean([max(locomo_token_f1(p, g) for p in preds) for g in golds]))
    if category in (2, 3, 4):
        return locomo_token_f1(prediction, gold)
    raise ValueError(f"unknown LoCoMo category {category!r} (expected 1-5)")


# -- confidence intervals --------------------------------------------------------------------------------------
def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0, 1 and small n)."""
    if n <= 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n successes the bounds are exactly 0 and 1; the float arithmetic leaves ~1e-17 residues.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; deterministic for a given ``seed``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def mean_ci(values: Sequence[float], kind: str, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The interval a report shows: Wilson for ``kind="accuracy"`` (0/1 scores), bootstrap for ``"f1"``."""
    if kind == "accuracy":
        return wilson_interval(float(sum(values)), len(values), confidence)
    if kind == "f1":
        return bootstrap_ci(values, confidence, seed=seed)
    raise ValueError(f"unknown score kind {kind!r}: expected 'accuracy' or 'f1'")


def _z(confidence: float) -> float:
    """Two-sided standard-normal quantile for ``confidence`` (1.959964 for 0.95)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    p = 1 - (1 - confidence) / 2
    # Bisection on erf: exact to ~1e-12 without scipy; it runs once per interval.
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
