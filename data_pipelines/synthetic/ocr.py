"""`ocr`: words and numbers rendered into an image; the answer is the text itself.

Reading needs no reasoning, so the worked trace is one sentence: this family is one where the
fast expert should do as well as the think expert. Harder levels have more tokens in a smaller font.
"""
from __future__ import annotations

import random

from data_pipelines.synthetic.draw import text_image
from data_pipelines.synthetic.problem import Problem

LEVELS = (1, 2, 3)  # 1: one word or number, 2: two, 3: three including a code
WORDS = tuple("""apple river stone cloud green table light water house paper smile horse plant music sugar
bread chair money night ocean pilot queen robot sheep tiger uncle voice whale youth zebra amber basket candle
dragon engine forest garden harbor island jacket kettle lemon marble needle orange pepper rabbit silver
tunnel violet window yellow bottle castle desert finger guitar hammer insect jungle ladder mirror noodle
parrot rocket saddle ticket velvet wallet""".split())


def random_code(rng: random.Random, length: int) -> str:
    """Letters and digits with a dash in the middle, e.g. K7P-42."""
    chars = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/O/0/1: they are easy to confuse when read
    body = "".join(rng.choice(chars) for _ in range(length))
    return f"{body[:length // 2]}-{body[length // 2:]}"


def _token(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(10, 999))


def make(rng: random.Random, level: int) -> Problem:
    tokens = [_token(rng) for _ in range(min(level, 2))]
    if level >= 3:
        tokens.insert(rng.randint(0, len(tokens)), random_code(rng, 6))
    text = " ".join(tokens)
    font_size = {1: 32, 2: 28, 3: 24}[level]
    return Problem("What text is in the image? Copy it exactly.", text, f"The image shows the text: {text}.",
                   {"steps": 1, "difficulty": level, "chars": len(text)}, [text_image(text, font_size=font_size)])
