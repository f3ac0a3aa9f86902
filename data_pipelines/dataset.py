"""Read and validate a data set before training starts, applying `data.on_bad_row`.

Every row is checked the way training will use it: the answer is there, the prompt is not empty,
each image decodes, and the prompt rendered for each expert (image tokens included) fits in
`data.max_prompt_tokens`. With `error` the first bad row stops the run with its id, file, 1-based
line or row, and reason; with `skip` bad rows are dropped, counted by reason, and the first few logged.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Iterable, Optional

from home_rl.errors import HomeRLError

from data_pipelines.config import DataConfig
from data_pipelines.images import ImageLoadError, load_image
from data_pipelines.readers import Origin, iter_located
from data_pipelines.render import RenderError, is_multimodal, render_prompt
from data_pipelines.schema import BadRowError
from data_pipelines.templates import EXPERTS, as_messages, text_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BadRowReport:
    total: int = 0  # rows read
    skipped: int = 0  # rows dropped
    by_reason: dict = dataclasses.field(default_factory=collections.Counter)  # reason kind -> count
    examples: list = dataclasses.field(default_factory=list)  # the first few messages, as logged

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.by_reason.items()))
        return f"{self.skipped} of {self.total} rows skipped" + (f" ({kinds})" if kinds else "")


@dataclasses.dataclass
class LoadedData:
    rows: list  # the clean rows, in file order
    report: BadRowReport
    origins: dict = dataclasses.field(default_factory=dict)  # row id -> Origin (file and 1-based line/row)


def load_dataset(cfg: DataConfig, processor_or_tokenizer: Any = None,
                 experts: Iterable[str] = EXPERTS) -> LoadedData:
    """Read `cfg.path`, validate every row for this model, and return the clean rows plus a report.

    Without a processor/tokenizer only the checks that need no model run (answer, prompt, images).
    """
    if not cfg.path:
        raise HomeRLError("data.path is empty: give a .jsonl/.parquet file or a data folder")
    report = BadRowReport()
    rows = []
    origins: dict[str, Origin] = {}
    for origin, item in iter_located(cfg.path, cfg.max_rows, cfg.answer_key, cfg.prompt_key):
        report.total += 1
        if isinstance(item, BadRowError):
            _bad(item, cfg, report)
            continue
        kind, reason = check_row(item, processor_or_tokenizer, cfg, experts)
        if kind is None and item["id"] in origins:
            kind, reason = "duplicate id", f"its id is used by an earlier row ({origins[item['id']].where})"
        if kind is not None:
            _bad(BadRowError(item["id"], origin.file, reason, origin.where, kind), cfg, report)
            continue
        origins[item["id"]] = origin
        rows.append(item)
    if report.skipped:
        log.warning("data %s: %s", cfg.path, report.summary())
    if not rows:
        raise HomeRLError(f"no usable rows in {cfg.path}" + (f": {report.summary()}" if report.total else ""))
    return LoadedData(rows, report, origins)


def check_row(row: dict, processor_or_tokenizer: Any, cfg: DataConfig,
              experts: Iterable[str] = EXPERTS) -> tuple[Optional[str], Optional[str]]:
    """(kind, reason) of what is wrong with `row`, or (None, None) if it can be trained on."""
    answer = row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()) or (isinstance(answer, list) and not any(
            str(a).strip() for a in answer)):
        return "missing answer", "missing answer"
    try:
        messages = as_messages(row.get("prompt"))
    except ValueError as e:
        return "empty prompt", str(e)
    if not any(text_of(m["content"]).strip() for m in messages if m["role"] != "system"):
        return "empty prompt", "empty prompt"
    if processor_or_tokenizer is None or not is_multimodal(processor_or_tokenizer):
        for i, ref in enumerate(row.get("images") or []):  # a text model rejects rows with images in render_prompt
            try:
                load_image(ref)
            except ImageLoadError as e:
                return "bad image", f"image {i}: {e}"
    if processor_or_tokenizer is None:
        return None, None
    for expert in experts:
        try:
            rendered = render_prompt(row, expert, processor_or_tokenizer, cfg, with_pixels=False)
        except ImageLoadError as e:
            return "bad image", str(e)
        except RenderError as e:
            return "unrenderable prompt", str(e)
        if rendered.num_tokens > cfg.max_prompt_tokens:
            return "prompt too long", (f"prompt is {rendered.num_tokens} tokens for the {expert} expert, "
                                       f"above data.max_prompt_tokens={cfg.max_prompt_tokens}")
    return None, None


def _bad(error: BadRowError, cfg: DataConfig, report: BadRowReport) -> None:
    if cfg.on_bad_row == "error":
        raise BadRowError(error.row_id, error.file, error.reason + " (set data.on_bad_row=skip to drop such rows)",
                          error.where, error.kind)
    report.skipped += 1
    report.by_reason[error.kind] += 1
    if len(report.examples) < cfg.log_bad_rows:
        report.examples.append(str(error))
        log.warning("skipping %s", error)
