"""BANKING77 test-time learning in the style of MemoryAgentBench.

An *episode* samples ``num_classes`` intents and maps them to arbitrary integer labels ``0..C-1``; the history
shows ``shots`` labelled utterances per class (``per_message`` of them per user message, shuffled), and each
example then asks for the label of a new, unlabeled utterance of one of those intents. Several queries share one
episode (``meta["group"]``). Choices are all ``C`` labels.

Rows are split by a stable hash of their text (``split="train"``: 80 %, ``"test"``: 20 %); demonstrations and
queries of an episode come from the same split and never repeat within it.
"""

from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

from ..examples import MemoryExample

__all__ = ["QUERY_TEMPLATE", "SPLITS", "find_banking77_file", "load_banking77"]

SPLITS = ("train", "test", "all")
QUERY_TEMPLATE = "Query: {text}\nWhich label does this query have? Answer with the number only."


def find_banking77_file(path: str | Path) -> Path:
    """Locate ``train.csv`` given the file, the ``banking77`` folder, or the benchmarks root."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "banking77"):
        if (folder / "train.csv").is_file():
            return folder / "train.csv"
    raise FileNotFoundError(f"no banking77 train.csv under {path} (or {path / 'banking77'})")


def _row_split(text: str) -> str:
    h = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")
    return "test" if h % 5 == 0 else "train"


def load_banking77(
    path: str | Path, *, split: str = "test", limit: int | None = None, seed: int = 0, num_classes: int = 10,
    shots: int = 5, queries_per_episode: int = 5, per_message: int = 5,
) -> list[MemoryExample]:
    """``limit`` query examples (default 100) over as many episodes as needed; deterministic given ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_classes < 2 or shots < 1 or queries_per_episode < 1 or per_message < 1:
        raise ValueError("num_classes >= 2, shots >= 1, queries_per_episode >= 1 and per_message >= 1 are required")
    by_intent: dict[str, list[str]] = {}
    with find_banking77_file(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            text, intent = row["text"].strip(), row["category"].strip()
            if split == "all" or _row_split(text) == split:
                by_intent.setdefault(intent, []).append(text)
    intents = sorted(i for i, rows in by_intent.items() if len(rows) > shots)
    if len(intents) < num_classes:
        raise ValueError(f"only {len(intents)} intents have more than {shots} rows in split {split!r}")
    limit = 100 if limit is None else limit
    out: list[MemoryExample] = []
    episode = 0
    while len(out) < limit:
        rng = random.Random(f"banking77:{seed}:{split}:{episode}")
        chosen = rng.sample(intents, num_classes)
        labels = list(range(num_classes))
        rng.shuffle(labels)
        label_of = dict(zip(chosen, labels, strict=True))
        demos: list[tuple[str, int]] = []
        pools: dict[str, list[str]] = {}
        for intent in chosen:
            rows = by_intent[intent][:]
            rng.shuffle(rows)
            demos.extend((t, label_of[intent]) for t in rows[:shots])
            pools[intent] = rows[shots:]
        rng.shuffle(demos)
        history = []
        for i in range(0, len(demos), per_message):
            lines = "\n".join(f"Query: {t}\nLabel: {lab}" for t, lab in demos[i : i + per_message])
            history.append({"role": "user", "content": "Here are labelled examples.\n" + lines})
        group = f"banking77-{split}-s{seed}-e{episode}"
        for q in range(min(queries_per_episode, limit - len(out))):
            intent = rng.choice([i for i in chosen if pools[i]])
            text = pools[intent].pop()
            out.append(MemoryExample(
                id=f"{group}-q{q}", task="banking77", history=[dict(m) for m in history],
                question=QUERY_TEMPLATE.format(text=text), answers=[str(label_of[intent])],
                choices=[str(label) for label in range(num_classes)],
                evidence=[i for i, m in enumerate(history) if f"Label: {label_of[intent]}" in m["content"]],
                meta={"group": group, "intent": intent, "num_classes": num_classes, "shots": shots, "split": split},
            ))
        episode += 1
    return out
