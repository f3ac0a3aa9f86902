"""`extract`: text-only questions whose answer stands in the prompt (the text twin of OCR).

Three kinds: the k-th word of a list, a code to copy, a field of a small record. A direct answer is
enough, so the router should learn `fast` here. Difficulty grows with the list / code / record size.
"""
from __future__ import annotations

import random

from data_pipelines.synthetic.ocr import WORDS, random_code
from data_pipelines.synthetic.problem import Problem

LEVELS = (1, 2, 3)
KINDS = ("word", "code", "field")
NAMES = ("Ana", "Bo", "Carl", "Dina", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kim", "Luis")
CITIES = ("Lima", "Oslo", "Rome", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Bern", "Riga")
PETS = ("cat", "dog", "fish", "bird", "frog", "horse")
JOBS = ("cook", "nurse", "pilot", "baker", "farmer", "judge", "tailor")
COLORS = ("red", "blue", "green", "black", "white", "orange")


def _ordinal_list(words: list[str], k: int) -> str:
    listed = ", ".join(f"{i} {w}" for i, w in enumerate(words[:k], 1))
    return f"The words are {listed}. Word {k} is {words[k - 1]}."


def make(rng: random.Random, level: int) -> Problem:
    kind = rng.choice(KINDS)
    extra = {"steps": 1, "difficulty": level, "kind": kind}
    if kind == "word":
        words = rng.sample(WORDS, 2 + 2 * level)
        k = rng.randint(1, len(words))
        return Problem(f"What is word {k} of this list: {' '.join(words)}", words[k - 1], _ordinal_list(words, k), extra)
    if kind == "code":
        code = random_code(rng, 2 + 2 * level)
        return Problem(f"Copy this code exactly: {code}", code, f"The code is {code}.", extra)
    fields = {"name": rng.choice(NAMES), "age": str(rng.randint(18, 80)), "city": rng.choice(CITIES),
              "pet": rng.choice(PETS), "job": rng.choice(JOBS), "color": rng.choice(COLORS)}
    keys = rng.sample(list(fields), 1 + level)
    asked = rng.choice(keys)
    record = "; ".join(f"{k}={fields[k]}" for k in keys)
    return Problem(f"Record: {record}. What is the {asked}?", fields[asked], f"The field {asked} is {fields[asked]}.", extra)
