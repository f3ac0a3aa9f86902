"""Router features: pooled prompt hidden states from the router's layer of the fast view (images included).

A prompt travels to the actor that holds the model as a small dict (`router_input`): its learner
token ids (image placeholders expanded), the image-token flags Qwen2.5-VL's 3D rope needs, and its
pixel tensors. Prompts are right-padded into batches: with causal attention the pads come after
every real token, so no real position sees them and mean or last pooling over the mask gives each
prompt the features it would get alone.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


def router_input(rendered: Any) -> dict:
    """What the router needs of a rendered prompt (data_pipelines.RenderedPrompt), without the PIL images."""
    return {"input_ids": list(rendered.prompt_token_ids), "mm_token_type_ids": rendered.mm_token_type_ids,
            "mm_inputs": dict(rendered.mm_inputs or {})}


def collate_router_inputs(items: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for a batch of router inputs (pixel tensors concatenated in prompt order)."""
    if not items:
        raise ValueError("no prompts to collate")
    longest = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    with_types = any(x.get("mm_token_type_ids") is not None for x in items)
    types = torch.zeros((len(items), longest), dtype=torch.long) if with_types else None
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if types is not None and x.get("mm_token_type_ids") is not None:
            types[i, :n] = torch.tensor(x["mm_token_type_ids"], dtype=torch.long)
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["mm_token_type_ids"] = types  # without them transformers places image tokens on 1-D positions
    images = [x["mm_inputs"] for x in items if x.get("mm_inputs")]
    if images:
        batch["pixel_values"] = torch.cat([m["pixel_values"] for m in images])
        batch["image_grid_thw"] = torch.cat([m["image_grid_thw"] for m in images])
    return batch


@torch.no_grad()
def compute_features(home: Any, items: Sequence[dict], batch_size: int = 8, pad_id: int = 0,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """[N, hidden] float32 router features of `items` (router_input dicts) at the router's own layer and pooling,
    `batch_size` prompts per forward pass."""
    at = (home.home_config["router_layer"], home.home_config["router_pooling"])
    return candidate_features(home, items, [at], batch_size, pad_id, device)[at]


@torch.no_grad()
def candidate_features(home: Any, items: Sequence[dict], candidates: Sequence[tuple[int, str]], batch_size: int = 8,
                       pad_id: int = 0, device: Optional[torch.device] = None) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, pooling): [N, hidden]} float32 features of `items` at each candidate, from one forward pass per
    batch that stops after the deepest layer. Prompts are batched in order of length (less padding), and the rows
    come back in input order."""
    if not items:
        raise ValueError("no prompts to compute router features for")
    device = device or next(home.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    out: dict[tuple[int, str], list[Optional[torch.Tensor]]] = {c: [None] * len(items) for c in candidates}
    for chunk in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
        batch = collate_router_inputs([items[i] for i in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        for candidate, features in home.hidden_features(list(candidates), use_cache=False, **batch).items():
            features = features.float().cpu()
            for row, i in enumerate(chunk):
                out[candidate][i] = features[row]
    return {c: torch.stack(rows) for c, rows in out.items()}


def router_inputs(rows: Sequence[dict], template: str, processor: Any, data: Any) -> list[dict]:
    """Each row's prompt as the router reads it: rendered with `template`'s expert, images as pixel tensors."""
    from data_pipelines import render_prompt

    return [router_input(render_prompt(row, template, processor, data)) for row in rows]
