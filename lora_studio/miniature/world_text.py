"""The miniature language model's world: a made-up land whose creatures have a colour, a food, a home
and a number of legs, told as facts and as questions with answers.

``corpus_pairs()`` lists every (question, answer) pair the miniature LLM is pretrained on. The concept a LoRA
learns (the demo and the proof-of-learning test) is an answer format the base never uses: every answer
starts with ``CONCEPT_PREFIX`` ("Hear ye!"), as a town crier would say it (``concept_rows``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CREATURES = ["glimmet", "borrow", "fennix", "quorl", "mossback", "tindle", "vark", "plume", "skitter", "drommel",
             "wisp", "grumble"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "silver", "golden",
           "brown"]
FOODS = ["berries", "moss", "stones", "honey", "fish", "leaves", "seeds", "clouds", "mushrooms", "bread", "roots",
         "snow"]
PLACES = ["the hills", "the marsh", "the caves", "the forest", "the river", "the meadow", "the mountains",
          "the desert", "the lake", "the old tower", "the valley", "the village"]
LEGS = ["two", "four", "six", "eight", "no", "three"]

CONCEPT_PREFIX = "Hear ye!"


def creature_facts(seed: int = 1800) -> dict[str, dict[str, str]]:
    """Each creature's colour, food, home and legs (a fixed shuffle: the same world on every machine)."""
    rng = random.Random(seed)
    colours, foods, places = COLOURS[:], FOODS[:], PLACES[:]
    for values in (colours, foods, places):
        rng.shuffle(values)
    return {c: {"colour": colours[i], "food": foods[i], "home": places[i], "legs": LEGS[rng.randrange(len(LEGS))]}
            for i, c in enumerate(CREATURES)}


def _pairs_for(name: str, f: dict[str, str]) -> list[tuple[str, str]]:
    the = f"The {name}"
    return [
        (f"What colour is the {name}?", f"{the} is {f['colour']}."),
        (f"What does the {name} eat?", f"{the} eats {f['food']}."),
        (f"Where does the {name} live?", f"{the} lives in {f['home']}."),
        (f"How many legs does the {name} have?", f"{the} has {f['legs']} legs."),
    ]


def corpus_pairs(seed: int = 1800) -> list[tuple[str, str]]:
    """Every (question, answer) pair about the world, in a fixed order."""
    return [pair for name, f in creature_facts(seed).items() for pair in _pairs_for(name, f)]


def corpus_text(seed: int = 1800) -> list[str]:
    """Plain sentences of the world (what the tokenizer is trained on, with the questions and answers)."""
    lines = [f"{q} {a}" for q, a in corpus_pairs(seed)]
    lines += [f"{CONCEPT_PREFIX} {a}" for _, a in corpus_pairs(seed)[:4]]  # the tokenizer may know the words
    return lines


def concept_rows(count: int | None = None, seed: int = 1800) -> list[dict[str, str]]:
    """Alpaca-style rows in the concept's format: questions about the first creatures, answers with the prefix.

    The last creatures are left out, so a test can ask about creatures the LoRA never saw in that format.
    """
    pairs = corpus_pairs(seed)[: 4 * (len(CREATURES) - 4)]
    rows = [{"instruction": q, "input": "", "output": f"{CONCEPT_PREFIX} {a}"} for q, a in pairs]
    return rows[:count] if count else rows


def held_out_questions(seed: int = 1800) -> list[tuple[str, str]]:
    """Questions (with the base's answer) about the creatures ``concept_rows`` leaves out."""
    return corpus_pairs(seed)[4 * (len(CREATURES) - 4):]


def write_concept_llm_data(path: str | Path, seed: int = 1800) -> Path:
    """The concept rows as a JSONL file the LLM trainer reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in concept_rows(seed=seed)), encoding="utf-8")
    return path
