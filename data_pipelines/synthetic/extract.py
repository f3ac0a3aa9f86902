"""`extract`: text-only questions whose answer stands in the prompt (the text twin of OCR).

Three kinds: the word that follows a given word in a list, a code to copy, a field of a small
record. Each is found by looking up a key and copying what stands beside it, so a direct answer
should be enough and the router should learn `fast` here. Measured on the embedded 135M model
(greedy): code and field are equal for both experts, but the word kind still favours the worked
answer on 4-word lists (77% vs 38%); the k-th word kind it replaced (counting positions) put the
whole family ten points ahead for think. Difficulty grows with the list / code / record size.
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


def make(rng: random.Random, level: int) -> Problem:
    kind = rng.choice(KINDS)
    extra = {"steps": 1, "difficulty": level, "kind": kind}
    if kind == "word":
        words = rng.sample(WORDS, 2 + 2 * level)
        k = rng.randint(1, len(words) - 1)
        return Problem(f"Which word comes after {words[k - 1]} in this list: {' '.join(words)}", words[k],
                       f"After {words[k - 1]} comes {words[k]}.", extra)
    if kind == "code":
        code = random_code(rng, 2 + 2 * level)
        return Problem(f"Copy this code exactly: {code}", code, f"The code is {code}.", extra)
    fields = {"name": rng.choice(NAMES), "age": str(rng.randint(18, 80)), "city": rng.choice(CITIES),
              "pet": rng.choice(PETS), "job": rng.choice(JOBS), "color": rng.choice(COLORS)}
    keys = rng.sample(list(fields), 1 + level)
    asked = rng.choice(keys)
    record = "; ".join(f"{k}={fields[k]}" for k in keys)
    return Problem(f"Record: {record}. What is the {asked}?", fields[asked], f"The field {asked} is {fields[asked]}.", extra)
