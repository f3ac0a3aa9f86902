"""Training checkpoints in `output_dir/checkpoints/step_NNNNNNNN/`: written atomically, found for resume.

A checkpoint folder holds the learners' DeepSpeed state (`engine/`, every rank's partition of the
weights, optimiser and LR schedule) and `trainer_state.json` (step, data loader position, ...).
It is written under a `.tmp` name and renamed when complete, so a run killed mid-save leaves no
folder that looks complete; `resume=auto` takes the newest complete one.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from home_rl.errors import ConfigError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    for folder in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(folder.name)
        if m and (folder / STATE_FILE).is_file():
            found.append((int(m.group(1)), folder))
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint to resume from: `auto` (newest in output_dir, if any), `never`, or a folder."""
    if resume in ("never", "", "none"):
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"trainer.resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE})")
    return folder


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def save_checkpoint(output_dir: str | Path, step: int, group, state: dict, keep: int = 2,
                    files: Optional[dict[str, bytes]] = None) -> Path:
    """Write the learners' state, `state` and any other `files` (name -> bytes) as checkpoint `step`, then keep
    only the newest `keep`."""
    final = checkpoint_root(output_dir) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    group.save_checkpoint(str(tmp))
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict:
    """Python's and numpy's global RNG states, as JSON (a checkpoint's trainer_state.json holds them)."""
    return {"python_rng": random.getstate(),
            "numpy_rng": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]}


def restore_rng(state: dict) -> None:
    """Set the global RNGs to what `rng_state()` saved."""
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
