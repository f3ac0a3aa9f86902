"""Readers: JSONL, Parquet (plain or verl-style), a `datasets` folder saved with `save_to_disk`.

Every reader yields rows of the schema in `schema.py`. A record that cannot even be parsed (a
broken JSON line) is yielded as a `BadRowError` instead of a row, so that the caller's
`on_bad_row` policy decides whether it stops the run or is skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from home_rl.errors import HomeRLError

from data_pipelines.schema import BadRowError, normalize_row

Item = dict | BadRowError
SUFFIXES = (".jsonl", ".json", ".parquet")


def read_rows(path: str | Path, max_rows: Optional[int] = None) -> list[dict]:
    """All rows of a data file or folder, as dicts of the schema; the first unreadable record raises BadRowError."""
    rows = []
    for item in iter_rows(path, max_rows):
        if isinstance(item, BadRowError):
            raise item
        rows.append(item)
    return rows


def iter_rows(path: str | Path, max_rows: Optional[int] = None) -> Iterator[Item]:
    """Rows (or BadRowErrors for unparseable records) of any supported format, in file order."""
    count = 0
    for item in _iter_any(Path(path)):
        if max_rows is not None and count >= max_rows:
            return
        count += 1
        yield item


def _iter_any(path: Path) -> Iterator[Item]:
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
    if (path / "data.jsonl").is_file():  # a folder written by `python -m data_pipelines.synthetic`
        yield from _iter_jsonl(path / "data.jsonl")
    elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        yield from _iter_saved_dataset(path)
    elif parquets := sorted(path.glob("*.parquet")):
        for file in parquets:
            yield from _iter_parquet(file)
    else:
        raise HomeRLError(f"no data found in folder {path}: expected data.jsonl, *.parquet files, "
                          "or a datasets folder saved with save_to_disk")


def _iter_jsonl(path: Path) -> Iterator[Item]:
    base = path.parent
    index = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRowError(f"line {line_no}", str(path), f"not valid JSON ({e.msg} at column {e.colno})")
                index += 1
                continue
            yield _normalized(raw, base, index, path)
            index += 1


def _iter_parquet(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # not a parquet file, truncated footer, ...
        raise HomeRLError(f"cannot read parquet file {path}: {e}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=256):
        for raw in batch.to_pylist():
            yield _normalized(raw, path.parent, index, path)
            index += 1


def _iter_saved_dataset(path: Path) -> Iterator[Item]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
        if split is None:
            raise HomeRLError(f"{path} holds splits {', '.join(ds)} and none is called 'train': "
                              "point data.path at one split's folder")
        ds = ds[split]
    # Arrow format keeps `Image` columns as their stored {"bytes", "path"} records instead of decoding them.
    index = 0
    for batch in ds.with_format("arrow").iter(batch_size=256):
        for raw in batch.to_pylist():
            yield _normalized(raw, path, index, path)
            index += 1


def _normalized(raw, base: Path, index: int, file: Path) -> Item:
    try:
        return normalize_row(raw, base, index, str(file))
    except BadRowError as e:
        return e
