"""bAbI tasks 1–3 (Weston et al. 2015) as memory examples.

A story becomes a history of user messages, one per statement; each question becomes one example whose history is
the story up to that question. Choices are the locations seen in the story so far (capped at ``max_choices``,
the answer always among them). Files: ``qa{1,2,3}_*_train.txt`` (lines ``ID sentence``; question lines
``ID question<TAB>answer<TAB>supporting ids``; IDs restart at 1 with each story).

Split: the files are bAbI's training splits; we hold out every fifth story (``split="test"``) and train on the
rest (``split="train"``); ``split="all"`` keeps every story.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..examples import MemoryExample

__all__ = ["LOCATIONS", "SPLITS", "find_babi_file", "load_babi"]

LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
SPLITS = ("train", "test", "all")


def find_babi_file(path: str | Path, task: int) -> Path:
    """Locate ``qa{task}_*_train.txt`` given the file itself, its folder, or the benchmarks root."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "babi"):
        hits = sorted(folder.glob(f"qa{task}_*_train.txt")) if folder.is_dir() else []
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no qa{task}_*_train.txt under {path} (or {path / 'babi'})")


def _parse_stories(path: Path) -> list[list[tuple[int, str, str | None, list[int]]]]:
    """Stories as lists of ``(line id, text, answer or None, supporting ids)``."""
    stories: list[list[tuple[int, str, str | None, list[int]]]] = []
    for raw in path.read_text().splitlines():
        if not raw.strip():
            continue
        num, _, rest = raw.partition(" ")
        line_id = int(num)
        if line_id == 1 or not stories:
            stories.append([])
        if "\t" in rest:
            question, answer, support = rest.split("\t")
            stories[-1].append((line_id, question.strip(), answer.strip(), [int(s) for s in support.split()]))
        else:
            stories[-1].append((line_id, rest.strip(), None, []))
    return stories


def load_babi(
    path: str | Path, task: int, *, split: str = "test", limit: int | None = None, seed: int = 0,
    max_choices: int = 4,
) -> list[MemoryExample]:
    """Examples of bAbI task ``task`` (1, 2 or 3), in file order; deterministic given ``seed``."""
    if task not in (1, 2, 3):
        raise ValueError(f"bAbI task must be 1, 2 or 3, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    file = find_babi_file(path, task)
    out: list[MemoryExample] = []
    for si, story in enumerate(_parse_stories(file)):
        if split != "all" and (si % 5 == 4) != (split == "test"):
            continue
        history: list[dict[str, str]] = []
        index_of: dict[int, int] = {}
        seen: list[str] = []
        for qn, (line_id, text, answer, support) in enumerate(story):
            if answer is None:
                index_of[line_id] = len(history)
                history.append({"role": "user", "content": text})
                for word in text.rstrip(".").split():
                    if word in LOCATIONS and word not in seen:
                        seen.append(word)
                continue
            rng = random.Random(f"babi:{seed}:{task}:{si}:{qn}")
            options = [w for w in seen if w != answer]
            rng.shuffle(options)
            choices = [answer] + options[: max_choices - 1]
            if len(choices) < 2:  # the answer is the only location mentioned so far: add one unseen place
                choices.append(rng.choice([w for w in LOCATIONS if w != answer]))
            rng.shuffle(choices)
            ex_id = f"babi{task}-{si}-{line_id}"
            out.append(MemoryExample(
                id=ex_id, task=f"babi{task}", history=[dict(m) for m in history], question=text,
                answers=[answer], choices=choices,
                evidence=sorted(index_of[s] for s in support if s in index_of),
                meta={"story": si, "group": ex_id, "n_statements": len(history), "split": split},
            ))
            if limit is not None and len(out) >= limit:
                return out
    return out
