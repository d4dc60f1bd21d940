"""General-ability data: short questions with reference answers, and a long unrelated conversation.

Used to check that a trained adapter leaves the base model's general answers intact, with a fresh state and after
~40 unrelated turns were written into it (``evaluation/probe.py`` ``general_ability``, the ladder's evaluate mode).
"""

from __future__ import annotations

from .synthetic import _SMALL_TALK

__all__ = ["GENERAL_QA", "long_conversation"]

#: Short general questions with reference answers (general-ability check; no history).
GENERAL_QA: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey."),
    ("What is two plus three?", "Two plus three is five."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What language is spoken in Spain?", "Spanish is spoken in Spain."),
    ("What do cows drink?", "Cows drink water."),
    ("What is the color of grass?", "Grass is green."),
    ("Name a fruit that is yellow.", "A banana is yellow."),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Which animal is known as man's best friend?", "The dog is known as man's best friend."),
    ("What is ten minus four?", "Ten minus four is six."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("What do we call a baby cat?", "A baby cat is called a kitten."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What is the chemical symbol for water?", "The chemical symbol for water is H2O."),
    ("How do you greet someone in the morning?", "You can say good morning."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
)


def long_conversation(n_turns: int = 40) -> list[dict[str, str]]:
    """``n_turns`` user/assistant exchanges of small talk (cycling through the synthetic task's small talk)."""
    msgs = []
    for i in range(n_turns):
        q, a = _SMALL_TALK[i % len(_SMALL_TALK)]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs
