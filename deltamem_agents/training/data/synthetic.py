"""Synthetic memory dialogues with an open vocabulary and a held-out split.

Each *group* is one conversation (the written context) followed by several questions about it, one
:class:`~deltamem_agents.training.examples.MemoryExample` per question; all examples of a group share the same
``history`` and ``meta["group"]``. A group contains:

* facts and preferences stated early (name, city, locker number, wifi code, the thing on the desk, pet, appointment
  time, morning drink) and asked about at the end;
* updates ("Correction: ...") that overwrite an earlier value: the latest value is the answer and the stale value
  is one of the wrong choices;
* multi-step task progress (a plan of three steps, then "done" reports; the question asks for the next step);
* distractor small talk between them.

Open vocabulary: every slot draws its values from a large generated pool (syllable names, place names, numbers,
alphanumeric codes, colour + object, flavour + drink, verb + object), and every value belongs to exactly one split by
a stable hash, so ``split="heldout"`` only ever uses values that ``split="train"`` can never produce. The last
statement and question phrasing of every slot is also reserved for the held-out split (``meta["phrasing_seen"]``).

Everything is a pure function of ``(seed, split, group index, level)``: the same call gives the same data on any
machine, and a training stream can be resumed at any group index.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..examples import MemoryExample

__all__ = [
    "HELDOUT_MODULUS",
    "LEVELS",
    "MAX_LEVEL",
    "SLOTS",
    "SLOT_NAMES",
    "SPLITS",
    "Slot",
    "curriculum_level",
    "sample_value",
    "synthetic_dialogues",
    "synthetic_group",
    "value_split",
]

SPLITS = ("train", "heldout")
#: One value in ``HELDOUT_MODULUS`` (by hash) is reserved for the held-out split.
HELDOUT_MODULUS = 5
MAX_LEVEL = 3

_SYLLABLES = (
    "ka ro mi ten zu bel dor va shi lo nex pra qui fel gar hol ju kre mon ny os pel rin sa tur ul vek wim xa yor "
    "zen bri cal dru em fa gri ha iv jo lum mar nor ob pim ras sol tav"
).split()
_PLACE_SUFFIXES = ("ton", "burg", "ville", "ford", "haven", "mouth", "field", "stad", "wick", "port")
_COLOURS = (
    "teal crimson amber violet ochre ivory indigo maroon olive silver golden turquoise coral lilac navy "
    "scarlet beige charcoal emerald mustard peach plum rust saffron"
).split()
_OBJECTS = (
    "lamp mug notebook vase clock stapler candle globe cactus kettle radio compass lantern teapot bowl "
    "statue frame basket mirror fan pencil ruler speaker keyboard trophy jar figurine plant scarf umbrella "
    "backpack helmet camera drone puzzle robot whistle marble feather shell"
).split()
_FLAVOURS = (
    "vanilla hazelnut ginger mint cinnamon lemon honey caramel cardamom coconut mango peach raspberry cherry "
    "lavender maple almond chai matcha smoky spicy iced warm oat cocoa"
).split()
_DRINKS = ("latte", "tea", "coffee", "smoothie", "cocoa", "espresso", "milkshake", "lemonade", "kefir", "juice")
_VERBS = (
    "pack fix paint clean order book call email sort label measure repair print sign return wash check "
    "update install buy"
).split()
_TASK_OBJECTS = (
    "van boxes oven kitchen shelves invoice tickets plumber landlord garage curtains lamp router printer "
    "contract keys fridge bike sofa windows carpet desk receipts passport insurance charger garden fence"
).split()
_PROJECTS = ("move", "renovation", "trip", "launch", "wedding", "audit", "party", "migration")


def _syllable_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()


def _place(rng: random.Random) -> str:
    return _syllable_name(rng) + rng.choice(_PLACE_SUFFIXES)


def _number(rng: random.Random) -> str:
    return str(rng.randint(100, 99999))


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    digits = "23456789"
    pick = [rng.choice(letters), rng.choice(letters), rng.choice(digits), "-", rng.choice(digits),
            rng.choice(digits), rng.choice(letters)]
    return "".join(pick)


def _time(rng: random.Random) -> str:
    return f"{rng.randint(6, 21)}:{rng.choice(range(0, 60, 5)):02d}"


def _colour_object(rng: random.Random) -> str:
    return f"{rng.choice(_COLOURS)} {rng.choice(_OBJECTS)}"


def _drink(rng: random.Random) -> str:
    return f"{rng.choice(_FLAVOURS)} {rng.choice(_DRINKS)}"


def _task_step(rng: random.Random) -> str:
    return f"{rng.choice(_VERBS)} the {rng.choice(_TASK_OBJECTS)}"


@dataclass(frozen=True)
class Slot:
    """One kind of fact: a value pool and its phrasings (the last of each is held out)."""

    name: str
    sample: Callable[[random.Random], str]
    statements: tuple[str, ...]
    questions: tuple[str, ...]


SLOTS: tuple[Slot, ...] = (
    Slot("name", _syllable_name,
         ("My name is {v}.", "Please call me {v}.", "You can call me {v} from now on.", "I'm {v}, by the way."),
         ("What is my name?", "What did I say my name was?", "How should you address me?")),
    Slot("city", _place,
         ("I live in {v}.", "My home town is {v}.", "I moved to {v} last year.", "These days I'm based in {v}."),
         ("Which town do I live in?", "Where is my home?", "What town did I say I live in?")),
    Slot("locker", _number,
         ("My locker number is {v}.", "The number on my locker is {v}.", "Remember my locker: number {v}.",
          "I was given locker {v} at the gym."),
         ("What is my locker number?", "Which locker is mine?", "What number is my gym locker?")),
    Slot("wifi", _code,
         ("The wifi password is {v}.", "Our wifi code is {v}.", "Note the wifi key: {v}.",
          "To get online here, use the password {v}."),
         ("What is the wifi password?", "What's the wifi code?", "Which password gets me online?")),
    Slot("desk", _colour_object,
         ("I keep a {v} on my desk.", "On my desk there is a {v}.", "My desk has a {v} on it.",
          "The only thing on my desk is a {v}."),
         ("What do I keep on my desk?", "What is on my desk?", "Which object sits on my desk?")),
    Slot("pet", _syllable_name,
         ("My dog is called {v}.", "Our dog's name is {v}.", "I have a dog named {v}.",
          "The dog at home answers to {v}."),
         ("What is my dog's name?", "What is our dog called?", "What name does my dog answer to?")),
    Slot("appointment", _time,
         ("My dentist appointment is at {v}.", "I see the dentist at {v}.", "The dentist booked me for {v}.",
          "Don't let me forget the dentist at {v}."),
         ("What time is my dentist appointment?", "When do I see the dentist?",
          "At what time was I booked at the dentist?")),
    Slot("drink", _drink,
         ("I prefer a {v} in the morning.", "Every morning I drink a {v}.", "My morning drink is a {v}.",
          "Nothing beats a {v} to start the day."),
         ("What do I like to drink in the morning?", "What is my morning drink?",
          "What do I drink to start the day?")),
)
SLOT_NAMES = tuple(s.name for s in SLOTS) + ("task",)
_SLOT_BY_NAME = {s.name: s for s in SLOTS}

_TASK_STATEMENTS = (
    "For the {p} I need to {a}, then {b}, then {c}.",
    "My {p} plan has three steps: {a}, {b} and {c}.",
    "Here is the {p} checklist, in order: {a}; {b}; {c}.",
)
_TASK_PROGRESS = ("Done: {s}.", "I finished the step '{s}'.", "Progress update: {s} is done.")
_TASK_QUESTIONS = ("What is the next step of my {p} plan?", "What should I do next for the {p}?",
                   "Which {p} step is still next?")
_UPDATE_PREFIXES = ("Correction: ", "Update: ", "Actually, scratch that. ")
_ACKS = ("Got it.", "Noted.", "Okay, I'll remember that.", "Thanks for telling me.", "Understood.")
_SMALL_TALK = (
    ("What's a good way to boil eggs?", "Simmer them for about nine minutes, then cool them in cold water."),
    ("Any tips for sleeping better?", "Keep a regular schedule and avoid screens before bed."),
    ("How do I keep basil alive?", "Give it plenty of light and water it when the soil feels dry."),
    ("Can you suggest a short stretch?", "Try reaching for your toes and holding it for twenty seconds."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("What's a quick lunch idea?", "A wrap with hummus, greens and roasted vegetables."),
    ("How long should I steep green tea?", "Two to three minutes in water just below boiling."),
    ("Is it going to be a busy week?", "It might be; planning the big tasks first usually helps."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("How do I remove a coffee stain?", "Blot it and rinse with cold water and a little dish soap."),
    ("What should I read next?", "A short story collection is a good change of pace."),
    ("How can I focus better?", "Work in short blocks with small breaks in between."),
    ("Any idea for a weekend walk?", "A loop through a nearby park or along a river is pleasant."),
    ("How do I say thanks in Spanish?", "You say 'gracias'."),
    ("What's a good warm-up before running?", "Five minutes of brisk walking and some leg swings."),
    ("How do I clean a keyboard?", "Turn it over, shake it gently, then wipe the keys with a damp cloth."),
)

#: (max facts, max distractor turns, update probability, task allowed) per curriculum level.
LEVELS = {0: (1, 0, 0.0, False), 1: (2, 1, 0.0, True), 2: (3, 2, 0.3, True), 3: (4, 4, 0.35, True)}


def value_split(slot: str, value: str) -> str:
    """The split a value belongs to, by a stable hash of the value alone (so a string held out for one slot is
    held out for every slot) — independent of seeds and of Python's hash randomisation. ``slot`` is accepted for
    symmetry with :func:`sample_value` and ignored."""
    del slot
    h = int.from_bytes(hashlib.sha1(value.encode()).digest()[:8], "big")
    return "heldout" if h % HELDOUT_MODULUS == 0 else "train"


def sample_value(slot: str, rng: random.Random, split: str, exclude: set[str] = frozenset()) -> str:
    """Draw a value of ``slot`` from ``split``'s part of the pool (rejection sampling on the hash split)."""
    sample = _task_step if slot == "task" else _SLOT_BY_NAME[slot].sample
    for _ in range(10_000):
        v = sample(rng)
        if v not in exclude and value_split(slot, v) == split:
            return v
    raise RuntimeError(f"could not draw a {split} value for slot {slot!r}")  # pragma: no cover


def _phrasing(rng: random.Random, options: tuple[str, ...], split: str) -> tuple[int, str]:
    """Train uses every phrasing but the last; held-out uses all of them."""
    n = len(options) if split == "heldout" else len(options) - 1
    i = rng.randrange(n)
    return i, options[i]


def synthetic_group(
    index: int, *, split: str = "train", seed: int = 0, level: int = MAX_LEVEL, questions_per_context: int = 4
) -> list[MemoryExample]:
    """One conversation and up to ``questions_per_context`` questions about it (a pure function of its args)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be in 0..{MAX_LEVEL}, got {level!r}")
    if questions_per_context < 1:
        raise ValueError("questions_per_context must be >= 1")
    rng = random.Random(f"deltamem-synthetic:{seed}:{split}:{level}:{index}")
    max_facts, max_distractors, p_update, task_ok = LEVELS[level]
    n_facts = rng.randint(max(1, max_facts - 1), max_facts)
    n_distractors = rng.randint(0, max_distractors)
    pool = list(SLOTS)
    rng.shuffle(pool)
    use_task = task_ok and rng.random() < 0.3
    fact_slots = [s.name for s in pool[: n_facts - 1 if use_task else n_facts]] + (["task"] if use_task else [])

    # Events in conversation order; every event is one user message followed by a short assistant reply.
    events: list[tuple[str, str, dict]] = []  # (kind, text, info)
    facts: dict[str, dict] = {}
    for slot in fact_slots:
        if slot == "task":
            steps: list[str] = []
            for _ in range(3):
                steps.append(sample_value("task", rng, split, exclude=set(steps)))
            project = rng.choice(_PROJECTS)
            pid, tmpl = _phrasing(rng, _TASK_STATEMENTS, split)
            events.append(("fact", tmpl.format(p=project, a=steps[0], b=steps[1], c=steps[2]),
                           {"slot": "task", "statement_id": pid}))
            facts["task"] = {"steps": steps, "project": project, "done": 0}
            continue
        s = _SLOT_BY_NAME[slot]
        value = sample_value(slot, rng, split)
        pid, tmpl = _phrasing(rng, s.statements, split)
        events.append(("fact", tmpl.format(v=value), {"slot": slot, "statement_id": pid}))
        facts[slot] = {"values": [value], "statement_id": pid}

    # Distractor small talk, inserted at random positions (never before the first fact: it would only pad).
    for _ in range(n_distractors):
        q, a = rng.choice(_SMALL_TALK)
        events.insert(rng.randint(1, len(events)), ("distractor", q, {"reply": a}))
    # Updates and task progress come after the statement they change.
    for slot, f in facts.items():
        if slot == "task":
            done = rng.randint(0, 2) if level > 0 else 0
            for d in range(done):
                _, tmpl = _phrasing(rng, _TASK_PROGRESS, split)
                events.append(("progress", tmpl.format(s=f["steps"][d]), {"slot": "task"}))
            f["done"] = done
        elif rng.random() < p_update:
            s = _SLOT_BY_NAME[slot]
            new = sample_value(slot, rng, split, exclude=set(f["values"]))
            _, tmpl = _phrasing(rng, s.statements, split)
            events.append(("update", rng.choice(_UPDATE_PREFIXES) + tmpl.format(v=new), {"slot": slot}))
            f["values"].append(new)

    history: list[dict[str, str]] = []
    latest_msg: dict[str, list[int]] = {}
    for kind, text, info in events:
        if kind in ("fact", "update", "progress"):
            slot = info["slot"]
            if kind == "update":
                latest_msg[slot] = [len(history)]
            else:
                latest_msg.setdefault(slot, []).append(len(history))
            history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": rng.choice(_ACKS)})
        else:
            history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": info["reply"]})

    group = f"synthetic-{split}-s{seed}-l{level}-{index}"
    examples: list[MemoryExample] = []
    asked = list(facts)
    rng.shuffle(asked)
    for qi, slot in enumerate(asked[:questions_per_context]):
        f = facts[slot]
        if slot == "task":
            steps, project = f["steps"], f["project"]
            answer = steps[f["done"]]
            others = [x for x in steps if x != answer]
            wrong = others + [sample_value("task", rng, split, exclude=set(steps))]
            qid, qtext = _phrasing(rng, _TASK_QUESTIONS, split)
            question = qtext.format(p=project)
            statement_seen = True
            updated = f["done"] > 0
        else:
            s = _SLOT_BY_NAME[slot]
            answer = f["values"][-1]
            stale = [v for v in f["values"][:-1]]
            wrong = stale[:]
            while len(wrong) < 3:
                wrong.append(sample_value(slot, rng, split, exclude=set(wrong) | set(f["values"])))
            qid, question = _phrasing(rng, s.questions, split)
            statement_seen = f["statement_id"] < len(s.statements) - 1
            updated = len(f["values"]) > 1
        choices = [answer] + wrong[:3]
        rng.shuffle(choices)
        examples.append(MemoryExample(
            id=f"{group}-q{qi}",
            task="synthetic",
            history=[dict(m) for m in history],
            question=question,
            answers=[answer],
            choices=choices,
            evidence=sorted(latest_msg[slot]),
            meta={
                "group": group,
                "slot": slot,
                "level": level,
                "split": split,
                "seen_in_training": split == "train",
                "phrasing_id": qid,
                "phrasing_seen": qid < (len(_TASK_QUESTIONS) if slot == "task" else len(
                    _SLOT_BY_NAME[slot].questions)) - 1 and statement_seen,
                "n_distractors": n_distractors,
                "n_facts": len(facts),
                "updated": updated,
            },
        ))
    return examples


def synthetic_dialogues(
    n_groups: int,
    *,
    split: str = "train",
    seed: int = 0,
    level: int | None = MAX_LEVEL,
    questions_per_context: int = 4,
    start: int = 0,
) -> list[MemoryExample]:
    """``n_groups`` conversations (groups ``start .. start+n_groups-1``), flattened to their questions.

    ``level=None`` mixes levels 0..3 uniformly (by group index), otherwise every group has that level.
    """
    out: list[MemoryExample] = []
    for i in range(start, start + n_groups):
        lvl = i % (MAX_LEVEL + 1) if level is None else level
        out.extend(synthetic_group(i, split=split, seed=seed, level=lvl, questions_per_context=questions_per_context))
    return out


def curriculum_level(index: int, total: int, stages: tuple[float, ...], seed: int = 0) -> int:
    """Level of training group ``index`` of ``total`` under a curriculum.

    ``stages[k]`` is the fraction of training after which stage ``k`` ends (increasing, last 1.0); in stage ``k``
    a group has level ``k`` with probability 0.7 and a uniformly drawn lower level otherwise (so easy cases keep
    being rehearsed). An empty ``stages`` means no curriculum: always :data:`MAX_LEVEL`.
    """
    if not stages:
        return MAX_LEVEL
    progress = index / max(total, 1)
    stage = next((k for k, end in enumerate(stages) if progress < end), len(stages) - 1)
    stage = min(stage, MAX_LEVEL)
    rng = random.Random(f"deltamem-curriculum:{seed}:{index}")
    return stage if stage == 0 or rng.random() < 0.7 else rng.randrange(stage)
