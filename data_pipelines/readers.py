"""Readers: JSONL, Parquet (plain or verl-style), a `datasets` folder saved with `save_to_disk`.

Every reader yields rows of the schema in `schema.py`. A record that cannot even be parsed (a
broken JSON line, bytes that are not UTF-8, a record without an answer) is yielded as a
`BadRowError` instead of a row, so that the caller's `on_bad_row` policy decides whether it stops
the run or is skipped. Records are named by their 1-based line (JSONL) or row (Parquet, datasets).

A folder with train and held-out splits (verl's `train.parquet` + `test.parquet`, or the same as
JSONL, or a saved DatasetDict) is read as its train split, with a warning: `find_splits` says which
files they are, so that a trainer can evaluate on the held-out one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterator, Optional

from home_rl.errors import HomeRLError

from data_pipelines.schema import BadRowError, normalize_row

log = logging.getLogger(__name__)

Item = dict | BadRowError
SUFFIXES = (".jsonl", ".json", ".parquet")
HELDOUT_SPLITS = ("test", "validation", "val")  # held-out split names, in order of preference


@dataclasses.dataclass(frozen=True)
class Origin:
    file: str  # the file (or save_to_disk folder) the record is in
    number: int  # its 1-based line (JSONL) or row (Parquet, datasets)
    unit: str = "row"  # line | row

    @property
    def where(self) -> str:
        return f"{self.unit} {self.number}"


Raw = tuple[Origin, object, Path]  # where, the raw record (or a BadRowError), the folder relative images are in


@dataclasses.dataclass(frozen=True)
class Splits:
    train: Path  # the training split's file (or save_to_disk folder)
    heldout: Path  # the held-out split's


def find_splits(path: str | Path) -> Optional[Splits]:
    """The train and held-out splits of a data folder (train.parquet + test.parquet, the same in JSONL, or a
    saved DatasetDict with a train and a test/validation split); None for a file or a folder without them."""
    folder = Path(path)
    if not folder.is_dir() or (folder / "data.jsonl").is_file():
        return None
    dict_info = folder / "dataset_dict.json"
    if dict_info.is_file():
        try:
            names = json.loads(dict_info.read_text()).get("splits") or []
        except (OSError, ValueError, AttributeError):
            return None  # the reader reports a broken folder
        heldout = next((n for n in HELDOUT_SPLITS if n in names), None)
        return Splits(folder / "train", folder / heldout) if "train" in names and heldout else None
    for suffix in (".parquet", ".jsonl", ".json"):
        train = folder / f"train{suffix}"
        heldout = next((folder / f"{n}{suffix}" for n in HELDOUT_SPLITS if (folder / f"{n}{suffix}").is_file()), None)
        if train.is_file() and heldout is not None:
            return Splits(train, heldout)
    return None


def read_rows(path: str | Path, max_rows: Optional[int] = None, answer_key: str = "",
              prompt_key: str = "") -> list[dict]:
    """All rows of a data file or folder, as dicts of the schema; the first unreadable record raises BadRowError."""
    rows = []
    for item in iter_rows(path, max_rows, answer_key, prompt_key):
        if isinstance(item, BadRowError):
            raise item
        rows.append(item)
    return rows


def iter_rows(path: str | Path, max_rows: Optional[int] = None, answer_key: str = "",
              prompt_key: str = "") -> Iterator[Item]:
    """Rows (or BadRowErrors for unparseable records) of any supported format, in file order."""
    for _, item in iter_located(path, max_rows, answer_key, prompt_key):
        yield item


def iter_located(path: str | Path, max_rows: Optional[int] = None, answer_key: str = "",
                 prompt_key: str = "") -> Iterator[tuple[Origin, Item]]:
    """(where it is, row or BadRowError) of every record, in file order: `answer_key` / `prompt_key` name the
    answer and prompt columns ("": the defaults of `schema.normalize_row`)."""
    count = 0
    for origin, raw, base in _iter_any(Path(path)):
        if max_rows is not None and count >= max_rows:
            return
        count += 1
        if isinstance(raw, BadRowError):
            yield origin, raw
            continue
        try:
            yield origin, normalize_row(raw, base, origin.number, origin.file, origin.where,
                                        answer_key, prompt_key)
        except BadRowError as e:
            yield origin, e



def _iter_any(path: Path) -> Iterator[Raw]:
    if not path.exists():
        raise HomeRLError(f"data path not found: {path}")
    if path.is_file():
        if path.suffix == ".parquet":
            yield from _iter_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            yield from _iter_jsonl(path)
        else:
            raise HomeRLError(f"unsupported data file {path}: expected one of {', '.join(SUFFIXES)} "
                              "or a folder saved with datasets' save_to_disk")
        return
    splits = find_splits(path)
    if splits is not None and splits.train.is_file():  # a saved DatasetDict picks its train split itself, below
        log.warning("data folder %s holds a train and a held-out split: reading %s only (%s is held out; "
                    "point data.path at a file to choose)", path, splits.train.name, splits.heldout.name)
        yield from _iter_any(splits.train)
    elif (path / "data.jsonl").is_file():  # a folder written by `python -m data_pipelines.synthetic`
        yield from _iter_jsonl(path / "data.jsonl")
    elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        yield from _iter_saved_dataset(path)
    elif parquets := sorted(path.glob("*.parquet")):
        for file in parquets:
            yield from _iter_parquet(file)
    else:
        raise HomeRLError(f"no data found in folder {path}: expected data.jsonl, *.parquet files, "
                          "train/test splits, or a datasets folder saved with save_to_disk")


def _iter_jsonl(path: Path) -> Iterator[Raw]:
    # Bytes, decoded line by line: a stray non-UTF-8 byte is then one bad row, not a crash of the whole file.
    with path.open("rb") as f:
        for line_no, data in enumerate(f, 1):
            origin = Origin(str(path), line_no, "line")
            try:
                line = data.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading BOM is not data
            except UnicodeDecodeError as e:
                yield origin, BadRowError(None, str(path), f"not UTF-8 text (byte 0x{data[e.start]:02x} at "
                                          f"position {e.start + 1} of the line)", origin.where), path.parent
                continue
            if not line.strip():
                continue
            try:
                raw = json.loads(line.rstrip("\r\n"))  # the newline is not part of the record (nor of its errors)
            except json.JSONDecodeError as e:
                # some of json's messages end in "at" ("Unterminated string starting at"): say it once
                reason = f"not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}"
                yield origin, BadRowError(None, str(path), reason, origin.where), path.parent
                continue
            yield origin, raw, path.parent


def _iter_parquet(path: Path) -> Iterator[Raw]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # not a parquet file, truncated footer, ...
        raise HomeRLError(f"cannot read parquet file {path}: {e}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=256):
        for raw in batch.to_pylist():
            number += 1
            yield Origin(str(path), number), raw, path.parent


def _iter_saved_dataset(path: Path) -> Iterator[Raw]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
        if split is None:
            raise HomeRLError(f"{path} holds splits {', '.join(ds)} and none is called 'train': "
                              "point data.path at one split's folder")
        if len(ds) > 1:
            log.warning("data folder %s holds splits %s: reading %s only (point data.path at a split's folder "
                        "to choose)", path, ", ".join(ds), split)
        ds = ds[split]
    # Arrow format keeps `Image` columns as their stored {"bytes", "path"} records instead of decoding them.
    number = 0
    for batch in ds.with_format("arrow").iter(batch_size=256):
        for raw in batch.to_pylist():
            number += 1
            yield Origin(str(path), number), raw, path
