"""Checking prompts before they reach the engine: images present, length within the context.

A prompt is a vLLM input dict, as prompt rendering makes it:

    {"prompt_token_ids": [...]}  or  {"prompt": "<|im_start|>user\\n..."}
    + optional "multi_modal_data": {"image": [PIL.Image, ...]}
    + optional "row_id": names the data row in errors (removed before vLLM sees the prompt)

Prompt rendering's output (data_pipelines RenderedPrompt: `.vllm_input`, `.row_id`) and dicts
holding the input under "vllm_input" are accepted as well.
Image placeholders stay unexpanded (one <|image_pad|> per image): vLLM expands them itself, and
expanding them twice makes a wrong prompt. vLLM does not complain about a placeholder without its
image (it generates from the bare placeholder token), so that is checked here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from home_rl.errors import HomeRLError

VLLM_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs")


class RolloutInputError(HomeRLError):
    """A prompt that cannot be generated from: too long, an image missing, a malformed input."""


@dataclasses.dataclass
class PreparedPrompt:
    index: int  # position in the batch
    engine_input: Optional[dict]  # what vLLM gets; None when the prompt is skipped
    num_tokens: int  # prompt tokens counted here (image placeholders count one each)
    row_id: Optional[str] = None
    truncated: bool = False
    too_long: bool = False


def describe(index: int, row_id: Optional[str]) -> str:
    return f"prompt {index}" + (f" (row {row_id})" if row_id is not None else "")


def as_vllm_prompt(prompt: Any) -> Any:
    """The vLLM input dict of `prompt` (with its "row_id"), from a dict or a rendered prompt; else as given."""
    if hasattr(prompt, "vllm_input"):
        return {**prompt.vllm_input, "row_id": getattr(prompt, "row_id", None)}
    if isinstance(prompt, dict) and "vllm_input" in prompt:
        return {**prompt["vllm_input"], "row_id": prompt.get("row_id", prompt.get("id"))}
    return prompt


def prepare_prompt(index: int, prompt: Any, tokenizer, image_token_id: Optional[int],
                   max_prompt_tokens: int, on_long_prompt: str) -> PreparedPrompt:
    """Validate one prompt and apply the long-prompt policy (error | truncate | skip)."""
    prompt = as_vllm_prompt(prompt)
    row_id = prompt.get("row_id") if isinstance(prompt, dict) else None
    row_id = None if row_id is None else str(row_id)
    where = describe(index, row_id)
    if not isinstance(prompt, dict) or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise RolloutInputError(f"{where}: expected a dict with either 'prompt' (text) or 'prompt_token_ids', "
                                f"got {type(prompt).__name__}"
                                + (f" with keys {sorted(prompt)}" if isinstance(prompt, dict) else ""))
    engine_input = {k: v for k, v in prompt.items() if k in VLLM_KEYS}

    if "prompt_token_ids" in engine_input:
        ids = list(engine_input["prompt_token_ids"])
    else:
        ids = tokenizer.encode(engine_input["prompt"], add_special_tokens=False)
    images = _images(engine_input, where)
    if images and image_token_id is None:
        raise RolloutInputError(f"{where}: has images, but the rollout model takes text only")
    if image_token_id is not None:
        placeholders = ids.count(image_token_id)
        if placeholders != len(images):
            missing = "no image was given (multi_modal_data.image)" if not images else f"{len(images)} were given"
            raise RolloutInputError(f"{where}: the prompt has {placeholders} image placeholder(s) but {missing}")

    out = PreparedPrompt(index, engine_input, len(ids), row_id)
    if len(ids) <= max_prompt_tokens:
        return out
    out.too_long = True
    if on_long_prompt == "skip":
        out.engine_input = None
    elif on_long_prompt == "truncate" and not images:
        out.engine_input = {**{k: v for k, v in engine_input.items() if k != "prompt"},
                            "prompt_token_ids": ids[-max_prompt_tokens:]}
        out.truncated = True
    else:
        why = " (a prompt with images cannot be truncated)" if on_long_prompt == "truncate" else ""
        raise RolloutInputError(f"{where}: {len(ids)} prompt tokens, more than the {max_prompt_tokens} that "
                                f"rollout.max_model_len - rollout.max_response_tokens allows{why}; "
                                "raise rollout.max_model_len or set rollout.on_long_prompt=truncate|skip")
    return out


def _images(engine_input: dict, where: str) -> list:
    mm = engine_input.get("multi_modal_data") or {}
    if not isinstance(mm, dict):
        raise RolloutInputError(f"{where}: multi_modal_data must be a dict like {{'image': [...]}}")
    images = mm.get("image", [])
    images = images if isinstance(images, (list, tuple)) else [images]
    for k, image in enumerate(images):
        if image is None:
            raise RolloutInputError(f"{where}: image {k} is missing (None in multi_modal_data.image)")
    return list(images)
