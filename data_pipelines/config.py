"""The `data` section of a recipe's config: where the prompts come from and how they are turned into tokens."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional


@dataclasses.dataclass
class DataConfig:
    path: str = ""  # data file or folder: .jsonl, .parquet (plain, verl- or TRL-style), a save_to_disk folder, a folder holding data.jsonl, or a verl folder of train/test splits (its train split)
    prompt_key: str = ""  # the prompt column (dotted for nested fields; "": prompt), e.g. problem for EasyR1's math12k
    answer_key: str = ""  # the answer column (dotted; "": answer, else reward_model.ground_truth, extra_info.answer, solution), e.g. label
    prompts_per_step: int = 16  # prompts per training step (each is sampled rollout.n times)
    on_bad_row: str = "error"  # error: stop before training, naming the row, file and reason | skip: drop the row, count it, log the first few
    max_prompt_tokens: int = 1024  # longest allowed prompt in tokens, image tokens included; longer rows are bad rows (unset: lowered to fit the model's context beside the response limit)
    max_rows: Optional[int] = None  # use only the first N rows of the file (None: all of them)
    shuffle: bool = True  # new order every epoch, a fixed permutation of (seed, epoch)
    stratify_by: str = ""  # a row field (dotted: extra_info.steps, data_source) whose values every batch holds in equal shares ("": plain shuffling)
    seed: int = 0  # seed of the per-epoch shuffling
    drop_last: bool = True  # drop the last, incomplete batch of an epoch (keeps every step prompts_per_step long)
    template: str = "auto"  # prompt template: auto (row's extra_info.template, else one named like its data_source, else default) | row (the row's own messages, unchanged) | a template name
    few_shot: int = 0  # worked example exchanges put before the question as earlier chat turns (0: none)
    min_pixels: Optional[int] = None  # images are resized to at least this many pixels (None: the processor's own setting)
    max_pixels: Optional[int] = None  # images are resized to at most this many pixels (None: the processor's own setting)
    log_bad_rows: int = 5  # in skip mode, how many dropped rows are logged one by one (the rest are only counted)

    CHOICES: ClassVar[dict] = {"on_bad_row": ("error", "skip")}
