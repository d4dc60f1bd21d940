"""The Porter stemmer, as NLTK's ``PorterStemmer()`` applies it by default (mode ``NLTK_EXTENSIONS``).

The official LoCoMo scorer stems every token with ``nltk.stem.PorterStemmer()`` before token F1, so a faithful
F1 needs the same stems. NLTK is not a dependency of this project; this module re-implements the algorithm
(M. F. Porter, "An algorithm for suffix stripping", 1980) together with the small departures NLTK makes in its
default mode: a table of irregular forms, words of two letters or fewer left alone, ``ies``/``ied`` on
four-letter words, the stricter ``y → i`` rule, ``alli`` tried first in step 2, ``bli → ble``, ``fulli → ful``
and ``logi → log``, and the two-letter ``cvc`` case.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

__all__ = ["stem"]

# NLTK_EXTENSIONS: irregular forms mapped straight to their stem.
_IRREGULAR = {
    "skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed", "exceed": "exceed",
    "succeed": "succeed",
}  # fmt: skip

_VOWELS = frozenset("aeiou")

Rule = tuple[str, str, Callable[[str], bool] | None]


def _is_consonant(word: str, i: int) -> bool:
    ch = word[i]
    if ch in _VOWELS:
        return False
    if ch == "y":
        return True if i == 0 else not _is_consonant(word, i - 1)
    return True


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-consonant sequences in ``[C](VC)^m[V]``."""
    form = "".join("c" if _is_consonant(stem, i) else "v" for i in range(len(stem)))
    return form.count("vc")


def _positive(stem: str) -> bool:
    return _measure(stem) > 0


def _contains_vowel(stem: str) -> bool:
    return any(not _is_consonant(stem, i) for i in range(len(stem)))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _ends_cvc(word: str) -> bool:
    n = len(word)
    if (
        n >= 3
        and _is_consonant(word, n - 3)
        and not _is_consonant(word, n - 2)
        and _is_consonant(word, n - 1)
        and word[-1] not in "wxy"
    ):
        return True
    return n == 2 and not _is_consonant(word, 0) and _is_consonant(word, 1)


def _apply(word: str, rules: list[Rule]) -> str:
    """Apply the first rule whose suffix matches; a failed condition stops the search (as in NLTK)."""
    for suffix, replacement, condition in rules:
        if suffix == "*d" and _ends_double_consonant(word):
            stem = word[:-2]
            if condition is None or condition(stem):
                return stem + replacement
            return word
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            if condition is None or condition(stem):
                return stem + replacement
            return word
    return word


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-3] + "ie"
    return _apply(word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        stem = word[:-3]
        return stem + "ee" if _measure(stem) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _contains_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    return _apply(
        stem,
        [
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", stem[-1] if stem else "", lambda _s: stem[-1] not in "lsz"),
            ("", "e", lambda s: _measure(s) == 1 and _ends_cvc(s)),
        ],
    )


def _step1c(word: str) -> str:
    return _apply(word, [("y", "i", lambda s: len(s) > 1 and _is_consonant(s, len(s) - 1))])


def _step2(word: str) -> str:
    if word.endswith("alli") and _positive(word[:-4]):
        return _step2(word[:-4] + "al")
    rules: list[Rule] = [
        ("ational", "ate", _positive), ("tional", "tion", _positive), ("enci", "ence", _positive),
        ("anci", "ance", _positive), ("izer", "ize", _positive), ("bli", "ble", _positive),
        ("alli", "al", _positive), ("entli", "ent", _positive), ("eli", "e", _positive),
        ("ousli", "ous", _positive), ("ization", "ize", _positive), ("ation", "ate", _positive),
        ("ator", "ate", _positive), ("alism", "al", _positive), ("iveness", "ive", _positive),
        ("fulness", "ful", _positive), ("ousness", "ous", _positive), ("aliti", "al", _positive),
        ("iviti", "ive", _positive), ("biliti", "ble", _positive), ("fulli", "ful", _positive),
        # The 'l' of 'logi' stays with the stem so that short stems (geo-, theo-) behave like long ones.
        ("logi", "log", lambda _s: _positive(word[:-3])),
    ]  # fmt: skip
    return _apply(word, rules)


def _step3(word: str) -> str:
    return _apply(
        word,
        [
            ("icate", "ic", _positive), ("ative", "", _positive), ("alize", "al", _positive),
            ("iciti", "ic", _positive), ("ical", "ic", _positive), ("ful", "", _positive),
            ("ness", "", _positive),
        ],
    )  # fmt: skip


def _step4(word: str) -> str:
    def big(s: str) -> bool:
        return _measure(s) > 1

    suffixes = ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent")
    rules: list[Rule] = [(s, "", big) for s in suffixes]
    rules.append(("ion", "", lambda s: _measure(s) > 1 and s[-1:] in ("s", "t")))
    rules += [(s, "", big) for s in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")]
    return _apply(word, rules)


def _step5a(word: str) -> str:
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            return stem
    return word


def _step5b(word: str) -> str:
    return _apply(word, [("ll", "l", lambda _s: _measure(word[:-1]) > 1)])


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """The Porter stem of ``word`` (lower-cased first), matching ``nltk.stem.PorterStemmer().stem``."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    for step in (_step1a, _step1b, _step1c, _step2, _step3, _step4, _step5a, _step5b):
        word = step(word)
    return word
