"""Offline synthetic data in four families, deterministic for a seed, each row with a worked solution.

    math     multi-step arithmetic word problems (1-6 steps), text or rendered into images: thinking helps as steps grow
    arith    single-step arithmetic questions ("What is 17 + 5?"): a direct answer is enough
    ocr      words, numbers and codes rendered into images, answer = the text: thinking does not help
    vqa      easy-vqa's shape/colour images and questions
    extract  text-only questions answered by copying from the prompt (the text twin of OCR): thinking does not help
    mix      the families combined with a given ratio

`generate(...)` writes `DIR/data.jsonl` (the row schema of data_pipelines.schema, plus `solution`)
and the PNG files it references under `DIR/images/`. The same arguments give byte-identical files.
Each family draws from its own generator seeded by (family, seed), so the math rows of a mix are the
first rows of `--task math` with the same seed.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence

from home_rl.errors import ConfigError

from data_pipelines.synthetic import arith, arithmetic, extract, ocr, vqa

FAMILIES = {"math": arithmetic, "arith": arith, "ocr": ocr, "vqa": vqa, "extract": extract}
TASKS = (*FAMILIES, "mix")
DEFAULT_RATIO = {"math": 0.25, "ocr": 0.25, "vqa": 0.25, "extract": 0.25}


def generate(task: str, n: int, seed: int, out: str | Path, levels: Optional[Sequence[int]] = None,
             ratio: Optional[dict] = None, image_fraction: float = 0.0, vqa_split: str = "train") -> Path:
    """Write `n` rows of `task` to `out/data.jsonl` (images under `out/images/`); returns the jsonl path."""
    rows, files = make_rows(task, n, seed, levels, ratio, image_fraction, vqa_split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "images").exists():
        shutil.rmtree(out / "images")  # files of an earlier run would otherwise linger beside the new ones
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    path = out / "data.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def make_rows(task: str, n: int, seed: int, levels: Optional[Sequence[int]] = None, ratio: Optional[dict] = None,
              image_fraction: float = 0.0, vqa_split: str = "train") -> tuple[list[dict], dict[str, bytes]]:
    """(rows, {relative image path: PNG bytes}) for `task`, without touching the disk."""
    if task not in TASKS:
        raise ConfigError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    if n < 0:
        raise ConfigError(f"--n must be at least 0, got {n}")
    options = {"math": {"image_fraction": image_fraction}, "vqa": {"split": vqa_split}}
    if task != "mix":
        return _family_rows(task, n, seed, levels, options.get(task, {}))
    counts = split_counts(n, ratio or DEFAULT_RATIO)
    rows, files = [], {}
    for family, count in counts.items():
        r, f = _family_rows(family, count, seed, None, options.get(family, {}))
        rows += r
        files.update(f)
    random.Random(f"mix/{seed}").shuffle(rows)
    return rows, files


def parse_levels(text: str) -> list[int]:
    """'1-3' or '1,2,5' -> [1, 2, 3] / [1, 2, 5]"""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def parse_ratio(text: str, key: str = "") -> dict[str, float]:
    """'math=0.5,extract=0.5' -> {'math': 0.5, 'extract': 0.5}; anything else is a ConfigError naming `key`."""
    out = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            sep = ""
        if not sep:
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}expected family=weight,... got {text!r}")
    return out


def split_counts(n: int, ratio: dict) -> dict[str, int]:
    """Row counts per family that sum to `n`, proportional to `ratio` (largest remainder)."""
    unknown = set(ratio) - set(FAMILIES)
    if unknown or not ratio or any(v < 0 for v in ratio.values()) or sum(ratio.values()) <= 0:
        raise ConfigError(f"bad mix ratio {ratio}: give non-negative weights for {', '.join(FAMILIES)}")
    total = sum(ratio.values())
    exact = {k: n * v / total for k, v in ratio.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], list(ratio).index(k)))[:n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _family_rows(family: str, n: int, seed: int, levels: Optional[Sequence[int]], options: dict):
    module = FAMILIES[family]
    levels = tuple(levels or module.LEVELS)
    if bad := [lv for lv in levels if lv not in module.LEVELS]:
        raise ConfigError(f"levels {bad} do not exist for {family}; its levels are {module.LEVELS}")
    rng = random.Random(f"{family}/{seed}")
    rows, files = [], {}
    for i in range(n):
        level = rng.choice(levels)
        problem = module.make(rng, level, **options)
        row_id = f"{family}-{seed}-{i:06d}"
        names = [f"images/{row_id}-{j}.png" for j in range(len(problem.images))]
        files.update(zip(names, problem.images))
        rows.append({"id": row_id, "data_source": family, "prompt": problem.prompt, "images": names,
                     "answer": problem.answer, "solution": {"think": problem.think, "answer": problem.answer},
                     "extra_info": {"family": family, **problem.extra}})
    return rows, files


def ensure_math_rows(train_path: Path, heldout_path: Optional[Path], rows: int, heldout_rows: int, seed: int,
                     levels: str) -> None:
    """A GRPO run's synthetic math: `rows` training rows at `train_path` and `heldout_rows` new problems of the
    same levels, none of them a training prompt, at `heldout_path` (each written once, when missing)."""
    from data_pipelines.readers import read_rows

    if not train_path.is_file():
        generate("math", rows, seed, train_path.parent, levels=parse_levels(levels))
    if heldout_path is not None and not heldout_path.is_file():
        train = {r["prompt"] for r in read_rows(train_path)}
        made, _ = make_rows("math", 4 * heldout_rows, seed + 1, levels=parse_levels(levels))
        kept = [r for r in made if r["prompt"] not in train][:heldout_rows]
        heldout_path.parent.mkdir(parents=True, exist_ok=True)
        heldout_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
