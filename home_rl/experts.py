"""The experts' names, in one place: every package (model, data, reward, learner, drivers) uses these.

This module imports nothing, so that light packages (data_pipelines, reward) can use it without torch.
"""
from __future__ import annotations

FAST, THINK = "fast", "think"
EXPERTS = (FAST, THINK)  # the order of the router's logits: index 0 is fast, 1 is think
EXPERT_INDEX = {name: i for i, name in enumerate(EXPERTS)}  # router label of each expert
REFERENCE = "think_ref"  # GRPO's frozen copy of the initial think expert (the KL reference), inside the same model


def row_type(row: dict, think_sources: list[str]) -> str:
    """The expert a row's data type belongs to: extra_info.expert, else think for reasoning sources, else fast."""
    named = (row.get("extra_info") or {}).get("expert")
    if named is not None:
        if named not in EXPERTS:
            raise ValueError(f"extra_info.expert is {named!r}; expected think or fast")
        return named
    return THINK if row.get("data_source") in think_sources else FAST
