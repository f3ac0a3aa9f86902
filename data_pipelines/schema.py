"""The row schema every reader returns, and the error that names a bad row.

A row is a plain dict:

    id           str               unique within the data set
    data_source  str               the family / benchmark it comes from (picks the prompt template)
    prompt       str | list[dict]  the question as text, or chat messages [{"role", "content"}]
    images       list[str | bytes] image files (absolute paths: relative ones are resolved against the
                                   data file's folder when read) or encoded image bytes
    answer       str | list[str]   the accepted answer(s)
    extra_info   dict              anything else (steps, difficulty, template, ...)
    solution     dict, optional    {"think": worked trace, "answer": final answer} for supervised cold starts

verl-style rows (prompt as chat messages, `reward_model.ground_truth`, `images` as
[{"bytes", "path"}]) are mapped onto the same schema.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from home_rl.errors import HomeRLError

FIELDS = ("id", "data_source", "prompt", "images", "answer", "extra_info")


class BadRowError(HomeRLError):
    """A data row that cannot be used: the message names the row id, the file and the reason."""

    def __init__(self, row_id: str, file: str, reason: str):
        self.row_id, self.file, self.reason = row_id, file, reason
        super().__init__(f"bad row {row_id!r} in {file}: {reason}")


def normalize_row(raw: Any, base_dir: Path, index: int, file: str) -> dict:
    """Map a raw record of any supported format onto the row schema.

    Only reshapes: a missing answer or an empty prompt stays as it is and is caught by validation,
    so that `on_bad_row` decides what happens to it. Relative image paths become absolute (against
    `base_dir`), so a row keeps working wherever it is used.
    """
    if not isinstance(raw, dict):
        raise BadRowError(f"#{index}", file, f"a row must be an object/record, got {type(raw).__name__}")
    extra = dict(raw.get("extra_info") or {})
    reward_model = raw.get("reward_model")
    answer = raw.get("answer")
    if answer is None and isinstance(reward_model, dict):  # verl-style row
        answer = reward_model.get("ground_truth")
    if answer is None and "answer" in extra:
        answer = extra["answer"]
    row_id = raw.get("id")
    if row_id is None:
        row_id = extra.get("index", index) if isinstance(reward_model, dict) else index
        row_id = f"{Path(file).stem}-{row_id}"
    images = raw.get("images")
    if images is None:
        images = raw.get("image")  # a single-image column, as many HF sets have
    if images is None:
        images = []
    elif isinstance(images, (str, bytes, dict)) or hasattr(images, "save"):  # one image rather than a list
        images = [images]
    row = {
        "id": str(row_id),
        "data_source": str(raw.get("data_source") or "unknown"),
        "prompt": _plain(raw.get("prompt")),
        "images": [_image_ref(im, base_dir) for im in images if im is not None],
        "answer": _answer(answer),
        "extra_info": _plain(extra),
    }
    if raw.get("solution") is not None:
        row["solution"] = _plain(raw["solution"])
    return row


def _answer(answer: Any) -> Optional[str | list[str]]:
    if answer is None:
        return None
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    if hasattr(answer, "tolist"):  # numpy arrays from parquet readers
        return _answer(answer.tolist())
    return str(answer)


def _image_ref(image: Any, base_dir: Path) -> str | bytes:
    """A path (made absolute) or encoded bytes; datasets' {"bytes", "path"} records and PIL images become bytes."""
    if isinstance(image, dict):  # HF `Image` storage and verl's parquet rows
        if image.get("bytes"):
            return bytes(image["bytes"])
        image = image.get("path") or ""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if hasattr(image, "save"):  # a PIL image given in memory: keep it lossless
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    path = Path(str(image))
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _plain(value: Any) -> Any:
    """Numpy arrays and tuples (from parquet / datasets) as plain lists, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value
