"""LoCoMo (snap-research/locomo): long two-person conversations and questions about them.

Each conversation becomes one history: every turn is one message, ``speaker_a``'s turns as ``user`` and
``speaker_b``'s as ``assistant`` (so roles alternate as in a chat), the content ``"Name: text"`` plus
``" [shares <image caption>]"`` for turns that shared a photo (the official prompts do the same with
"and shared ..."), and the first turn of each session prefixed with ``"[<session date and time>] "`` (temporal
questions need the dates). Evidence ``dia_id``\\ s (``"D3:7"``) map to the index of their turn; malformed ids
are skipped and counted in ``meta["unmapped_evidence"]``.

Questions follow the official evaluation: category 2 (temporal) asks for an approximate date using the session
dates; category 5 (adversarial) offers "(a) Not mentioned in the conversation" and "(b) <adversarial answer>"
in a random but seeded order, and is scored 1 when the answer (a bare "(a)"/"(b)" is mapped to its option)
says "not mentioned" or "no information available". Categories as the official scorer numbers them:
1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from ...training.examples import MemoryExample

__all__ = ["CATEGORY_NAMES", "LOCOMO_SYSTEM", "load_locomo"]

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
NOT_MENTIONED = "Not mentioned in the conversation"
LOCOMO_SYSTEM = "You answer questions about a long conversation between {a} and {b}, using only what they said."
_INSTRUCTION = (
    "Based on the conversation, write an answer in the form of a short phrase for the following question. "
    "Answer with exact words from the conversation whenever possible.\nQuestion: {q}"
)
_DIA_ID = re.compile(r"D(\d+):(\d+)")


def _session_numbers(conv: dict[str, Any]) -> list[int]:
    nums = [int(k.split("_")[1]) for k in conv if re.fullmatch(r"session_\d+", k)]
    return sorted(nums)


def conversation_history(conv: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The messages of one LoCoMo ``conversation`` object and a map from ``dia_id`` to message index."""
    speaker_a = conv.get("speaker_a")
    history: list[dict[str, str]] = []
    index: dict[str, int] = {}
    for n in _session_numbers(conv):
        when = conv.get(f"session_{n}_date_time")
        for j, turn in enumerate(conv[f"session_{n}"]):
            content = f"{turn['speaker']}: {turn['text']}"
            if turn.get("blip_caption"):
                content += f" [shares {turn['blip_caption']}]"
            if j == 0 and when:
                content = f"[{when}] {content}"
            role = "user" if turn["speaker"] == speaker_a else "assistant"
            index[turn["dia_id"]] = len(history)
            history.append({"role": role, "content": content})
    return history, index


def _question_text(qa: dict[str, Any], rng: random.Random) -> tuple[str, list[str], dict[str, str] | None]:
    category = int(qa["category"])
    question = qa["question"]
    if category == 5:
        adversarial = str(qa.get("adversarial_answer", qa.get("answer", "")))
        if rng.random() < 0.5:
            key = {"a": NOT_MENTIONED, "b": adversarial}
        else:
            key = {"a": adversarial, "b": NOT_MENTIONED}
        question = f"{question} Select the correct answer: (a) {key['a']} (b) {key['b']}."
        return question, [NOT_MENTIONED], key
    if category == 2:
        question = f"{question} Use DATE of CONVERSATION to answer with an approximate date."
    return question, [str(qa["answer"])], None


def load_locomo(
    path: str | Path, limit: int | None = None, seed: int = 0, categories: set[int] | None = None
) -> list[MemoryExample]:
    """Load LoCoMo questions as examples (one per question; questions of a conversation share its history).

    ``limit`` draws that many questions at random (seeded) across all conversations, then keeps them in
    conversation order so each history is processed once.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.json"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one LoCoMo .json file, found {len(candidates)}")
        path = candidates[0]
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(c, dict) and "conversation" in c and "qa" in c for c in data):
        raise ValueError(f"{path}: not a LoCoMo file (expected a list of {{sample_id, conversation, qa}})")
    examples: list[MemoryExample] = []
    for c_index, sample in enumerate(data):
        conv = sample["conversation"]
        sample_id = str(sample.get("sample_id", f"conv-{c_index}"))
        history, index = conversation_history(conv)
        system = LOCOMO_SYSTEM.format(a=conv.get("speaker_a", "A"), b=conv.get("speaker_b", "B"))
        for q_index, qa in enumerate(sample["qa"]):
            category = int(qa["category"])
            if categories is not None and category not in categories:
                continue
            rng = random.Random(f"{seed}:{sample_id}:{q_index}")
            question, answers, key = _question_text(qa, rng)
            evidence, unmapped = set(), []
            for ev in qa.get("evidence", []) or []:
                ids = _DIA_ID.findall(str(ev))
                hits = [index[f"D{s}:{t}"] for s, t in ids if f"D{s}:{t}" in index]
                evidence.update(hits)
                if not hits:
                    unmapped.append(ev)
            meta: dict[str, Any] = {
                "system": system, "conversation": sample_id, "category": category,
                "category_name": CATEGORY_NAMES.get(category, str(category)), "question_raw": qa["question"],
            }  # fmt: skip
            if key is not None:
                meta["answer_key"] = key
                meta["adversarial_answer"] = key["a"] if key["b"] == NOT_MENTIONED else key["b"]
            if unmapped:
                meta["unmapped_evidence"] = unmapped
            examples.append(
                MemoryExample(
                    id=f"{sample_id}-q{q_index}", task="locomo", history=history,
                    question=_INSTRUCTION.format(q=question), answers=answers, evidence=sorted(evidence),
                    meta=meta,
                )  # fmt: skip
            )
    if limit is not None and limit < len(examples):
        order = {ex.id: i for i, ex in enumerate(examples)}
        picked = random.Random(seed).sample(examples, limit)
        examples = sorted(picked, key=lambda ex: order[ex.id])
    return examples
