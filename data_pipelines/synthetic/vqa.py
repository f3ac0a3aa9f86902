"""`vqa`: real images and questions from the `easy-vqa` package (one coloured shape per 64x64 image).

Questions ask for the shape, its colour, or yes/no about either. Each image's colour and shape are
read off the package's own questions about it, so the worked trace can say what the image shows.
Level 1: yes/no questions; level 2: what colour / what shape.
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from home_rl.errors import HomeRLError

from data_pipelines.synthetic.problem import Problem

LEVELS = (1, 2)
SHAPES = ("circle", "rectangle", "triangle")


@lru_cache(maxsize=2)
def _questions(split: str) -> tuple[list, dict, dict]:
    """(questions as (text, answer, image id), image id -> image path, image id -> (colour, shape))."""
    try:
        import easy_vqa
    except ImportError:
        raise HomeRLError("the vqa family needs the `easy-vqa` package: pip install easy-vqa") from None
    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    colors = set(easy_vqa.get_answers()) - set(SHAPES) - {"yes", "no"}
    seen: dict[int, dict] = {}
    for text, answer, image_id in zip(texts, answers, ids):
        attrs = seen.setdefault(image_id, {})
        if answer in SHAPES:
            attrs["shape"] = answer
            color = next((c for c in colors if f" {c} " in f" {text} "), None)  # "what is the blue shape?"
            if color:
                attrs["color"] = color
        elif answer in colors:
            attrs["color"] = answer
    questions = sorted(zip(texts, answers, ids), key=lambda q: (q[2], q[0]))  # a fixed order, whatever json gives
    return questions, paths, {i: (a.get("color"), a.get("shape")) for i, a in seen.items()}


def make(rng: random.Random, level: int, split: str = "train") -> Problem:
    questions, paths, attrs = _questions(split)
    while True:
        text, answer, image_id = questions[rng.randrange(len(questions))]
        if (answer in ("yes", "no")) == (level == 1):
            break
    color, shape = attrs.get(image_id, (None, None))
    seen = " ".join(x for x in (color, shape) if x)
    think = f"The image shows a {seen}." if seen else "I look at the shape in the image."
    prompt = text[0].upper() + text[1:] + " Answer with one word."
    return Problem(prompt, answer, think, {"steps": 1, "difficulty": level, "image_id": image_id, "split": split},
                   [Path(paths[image_id]).read_bytes()])
