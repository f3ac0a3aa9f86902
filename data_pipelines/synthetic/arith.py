"""`arith`: single-step arithmetic questions ("What is 17 + 5?"), text only.

The text twin of a one-line calculation: both numbers and the operation stand side by side in the
question, so a direct answer is enough and thinking should not pay (the router should learn `fast`
here). A one-step *word* problem (`math` with 1 step) is different for a small model: it must first
find the numbers in the sentences, and a 135M model answers those directly in about 6% of samples
(measured), against 75% when it writes the step out. Numbers stay in the range of `math`'s steps.
"""
from __future__ import annotations

import random

from data_pipelines.synthetic.problem import Problem

LEVELS = (1,)
PHRASES = ("What is {q}?", "Compute {q}.", "Calculate {q}.")


def make(rng: random.Random, level: int) -> Problem:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        c = a + b
    elif op == "-":
        a = rng.randint(2, 20)
        b = rng.randint(1, min(12, a - 1))
        c = a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        c = a * b
    question = f"{a} {op} {b}"
    return Problem(rng.choice(PHRASES).format(q=question), str(c), f"{question} = {c}.",
                   {"steps": 1, "difficulty": level, "op": op})
