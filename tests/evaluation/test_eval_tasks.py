"""Task loaders: the generic conversation JSONL (validation with line numbers) and LoCoMo."""

from __future__ import annotations

import json

import pytest

from deltamem_agents.evaluation.tasks import ConversationFormatError, load_conversation_jsonl, load_eval_task
from deltamem_agents.evaluation.tasks.locomo import NOT_MENTIONED, load_locomo

GOOD = {
    "history": [{"role": "user", "content": "My cat is Tom."}, {"role": "assistant", "content": "Noted."}],
    "question": "What is my cat called?",
    "answer": "Tom",
    "evidence": [0],
}


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_valid_file_loads(tmp_path):
    second = {**GOOD, "id": "x", "answer": ["Tom", "Tommy"], "choices": ["Tom", "Max"], "system": "Be brief."}
    examples = load_conversation_jsonl(_write(tmp_path, [GOOD, "", second]))
    assert [e.id for e in examples] == ["conversation-1", "x"]
    assert examples[0].answers == ["Tom"] and examples[0].evidence == [0]
    assert examples[1].choices == ["Tom", "Max"] and examples[1].meta["system"] == "Be brief."


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        ({k: v for k, v in GOOD.items() if k != "question"}, "missing required field 'question'"),
        ({k: v for k, v in GOOD.items() if k != "answer"}, "missing required field 'answer'"),
        ({**GOOD, "history": [{"role": "bot", "content": "x"}]}, "history[0].role must be one of"),
        ({**GOOD, "history": [{"role": "user"}]}, "history[0] must be an object"),
        ({**GOOD, "evidence": [5]}, "evidence indices [5] out of range"),
        ({**GOOD, "choices": ["Max", "Rex"]}, "is among the choices"),
        ({**GOOD, "answer": []}, "'answer' must be a string"),
        ({**GOOD, "colour": "red"}, "unknown field(s) ['colour']"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_errors_name_the_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(ConversationFormatError) as info:
        load_conversation_jsonl(path)
    assert f"{path}:2:" in str(info.value)
    assert message in str(info.value)


def test_duplicate_ids_and_empty_file(tmp_path):
    with pytest.raises(ConversationFormatError, match="duplicate id 'a' .first on line 1"):
        load_conversation_jsonl(_write(tmp_path, [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConversationFormatError, match="no examples"):
        load_conversation_jsonl(empty)
    with pytest.raises(FileNotFoundError):
        load_conversation_jsonl(tmp_path / "missing.jsonl")


def test_limit_and_task_errors(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD, GOOD])
    assert len(load_eval_task("conversation", path, limit=2).examples) == 2
    with pytest.raises(ValueError, match="unknown task"):
        load_eval_task("nope", path)
    with pytest.raises(ValueError, match="--subtask"):
        load_eval_task("babi", path)
    with pytest.raises(ValueError, match="needs --data"):
        load_eval_task("locomo", None)


LOCOMO = [
    {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "Ann", "speaker_b": "Bob",
            "session_1_date_time": "1:00 pm on 8 May, 2023",
            "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "I ran a charity race."},
                {"speaker": "Bob", "dia_id": "D1:2", "text": "Great!", "blip_caption": "a photo of a medal"},
            ],
            "session_2_date_time": "2:00 pm on 9 May, 2023",
            "session_2": [{"speaker": "Ann", "dia_id": "D2:1", "text": "I paint and hike."}],
        },
        "qa": [
            {"question": "What did Ann run?", "answer": "charity race", "evidence": ["D1:1"], "category": 4},
            {"question": "What does Ann do?", "answer": "painting, hiking", "evidence": ["D2:1", "D:11:26"],
             "category": 1},
            {"question": "When was the race?", "answer": 2023, "evidence": ["D1:1"], "category": 2},
            {"question": "What did Bob win?", "adversarial_answer": "a car", "evidence": [], "category": 5},
        ],
    }
]  # fmt: skip


def test_locomo_loader(tmp_path):
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps(LOCOMO))
    examples = load_locomo(path)
    assert len(examples) == 4
    history = examples[0].history
    assert history[0] == {"role": "user", "content": "[1:00 pm on 8 May, 2023] Ann: I ran a charity race."}
    assert history[1] == {"role": "assistant", "content": "Bob: Great! [shares a photo of a medal]"}
    assert history[2]["content"].startswith("[2:00 pm on 9 May, 2023] Ann:")
    assert all(e.history is history for e in examples)  # one history object per conversation
    assert examples[0].evidence == [0] and examples[0].meta["category"] == 4
    assert examples[1].evidence == [2] and examples[1].meta["category_name"] == "multi-hop"
    assert examples[2].answers == ["2023"] and "approximate date" in examples[2].question
    adv = examples[3]
    assert adv.answers == [NOT_MENTIONED] and "Select the correct answer: (a)" in adv.question
    assert set(adv.meta["answer_key"].values()) == {NOT_MENTIONED, "a car"}
    assert adv.meta["system"].startswith("You answer questions about a long conversation between Ann and Bob")
    # limit samples across the file deterministically, keeping file order
    a, b = load_locomo(path, limit=2, seed=1), load_locomo(path, limit=2, seed=1)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] == sorted((e.id for e in a), key=lambda i: int(i.split("-q")[1]))
