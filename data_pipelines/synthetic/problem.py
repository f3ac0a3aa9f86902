"""What a synthetic family produces for one row, before ids and file names are given."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Problem:
    prompt: str  # the question text
    answer: str  # the final answer
    think: str  # the worked reasoning, short and regular (a small model learns it in a cold start)
    extra: dict  # goes to extra_info: steps, difficulty, and family details
    images: list = dataclasses.field(default_factory=list)  # PNG bytes, in the order the prompt uses them
