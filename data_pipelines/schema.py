"""The row schema every reader returns, and the error that names a bad row.

A row is a plain dict:

    id           str               unique within the data set (default: the file's stem and the row's 1-based line/row)
    data_source  str               the family / benchmark it comes from (picks the prompt template)
    prompt       str | list[dict]  the question as text, or chat messages [{"role", "content"}]
    images       list[str | bytes] image files (absolute paths: relative ones are resolved against the
                                   data file's folder when read) or encoded image bytes
    answer       str | list[str]   the accepted answer(s)
    extra_info   dict              anything else (steps, difficulty, template, ...)
    solution     dict, optional    {"think": worked trace, "answer": final answer} for supervised starts

Other frameworks' rows map onto the same schema:
- verl: prompt as chat messages, `reward_model.ground_truth`, `images` as [{"bytes", "path"}];
- TRL: `prompt` as text or chat messages, the answer in a `solution` column (a string);
- EasyR1 / OpenRLHF / plain HF sets: name the columns with `data.prompt_key` / `data.answer_key`.

A string `solution` is the answer when the row has no other; beside an answer column it is the
worked trace. Either way `row["solution"]` is the {think, answer} dict that supervised training reads.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from home_rl.errors import HomeRLError

FIELDS = ("id", "data_source", "prompt", "images", "answer", "extra_info")
# Where the answer is looked for when `data.answer_key` is empty, in this order (dotted: nested fields).
ANSWER_KEYS = ("answer", "reward_model.ground_truth", "extra_info.answer", "solution")


class BadRowError(HomeRLError):
    """A data row that cannot be used: the message names the row id, the file, the 1-based line or row, and why.

    `kind` groups the reason for the skip report (missing answer, empty prompt, ...).
    """

    def __init__(self, row_id: Optional[str], file: str, reason: str, where: str = "", kind: str = "unreadable"):
        self.row_id, self.file, self.reason, self.where, self.kind = row_id, file, reason, where, kind
        name = f"bad row {row_id!r}" if row_id is not None else "bad row"
        super().__init__(f"{name} in {file}{', ' + where if where else ''}: {reason}")


def normalize_row(raw: Any, base_dir: Path, number: int, file: str, where: str = "",
                  answer_key: str = "", prompt_key: str = "") -> dict:
    """Map a raw record of any supported format onto the row schema.

    `number` is the record's 1-based line (JSONL) or row (Parquet, datasets), which default ids use;
    `where` names it in errors ("line 3"). Mostly reshapes: an empty prompt or answer is left to
    validation, but a row with no prompt or no answer value at all is a BadRowError that lists the
    columns it has, since the fix is then often a key (`data.prompt_key`, `data.answer_key`). Relative image
    paths become absolute (against `base_dir`), so a row keeps working wherever it is used.
    """
    if not isinstance(raw, dict):
        raise BadRowError(None, file, f"a row must be an object/record, got {type(raw).__name__}", where)
    extra = raw.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise BadRowError(raw.get("id"), file, f"extra_info must be an object, got {type(extra).__name__}", where)
    reward_model = raw.get("reward_model")
    row_id = raw.get("id")
    if row_id is None:
        row_id = extra.get("index", number) if isinstance(reward_model, dict) else number
        row_id = f"{Path(file).stem}-{row_id}"
    row_id = str(row_id)

    prompt = _field(raw, prompt_key or "prompt")
    if prompt is None:
        raise BadRowError(row_id, file, f"no prompt column {prompt_key or 'prompt'!r} (data.prompt_key names another); "
                          f"prompt must be text or a list of chat messages; {_columns(raw)}", where, "empty prompt")
    solution = raw.get("solution")
    if answer_key:
        answer = _field(raw, answer_key)
        if answer is None:
            raise BadRowError(row_id, file, f"missing answer: no value in data.answer_key={answer_key!r}; "
                              f"{_columns(raw)}", where, "missing answer")
    else:
        answer = next((v for v in (_field(raw, k) for k in ANSWER_KEYS[:-1]) if v is not None), None)
        if answer is None and isinstance(solution, str):  # TRL: the answer is the `solution` column
            answer = solution
        if answer is None and isinstance(solution, dict):
            answer = solution.get("answer")
        if answer is None:
            raise BadRowError(row_id, file, f"missing answer: no value in {', '.join(ANSWER_KEYS[:-1])} or "
                              f"{ANSWER_KEYS[-1]} (data.answer_key names the answer column); {_columns(raw)}", where,
                              "missing answer")

    images = raw.get("images")
    if images is None:
        images = raw.get("image")  # a single-image column, as many HF sets have
    if images is None:
        images = []
    elif isinstance(images, (str, bytes, dict)) or hasattr(images, "save"):  # one image rather than a list
        images = [images]
    row = {
        "id": row_id,
        "data_source": str(raw.get("data_source") or "unknown"),
        "prompt": _plain(prompt),
        "images": [_image_ref(im, base_dir) for im in images if im is not None],
        "answer": _answer(answer),
        "extra_info": _plain(extra),
    }
    if isinstance(solution, str):
        # beside another answer column a string solution is the worked trace (MATH-style sets); alone, the answer
        row["solution"] = ({"answer": solution} if answer is solution
                           else {"think": solution, "answer": _first(row["answer"])})
    elif solution is not None:
        row["solution"] = _plain(solution)
    return row


def _field(raw: dict, key: str) -> Any:
    """The value at a dotted key of a raw record (`reward_model.ground_truth`); None where it lacks it."""
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _columns(raw: dict) -> str:
    return "the row has columns: " + (", ".join(map(str, raw)) or "none")


def _first(answer: Optional[str | list[str]]) -> Optional[str]:
    return answer[0] if isinstance(answer, list) and answer else answer if isinstance(answer, str) else None


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
