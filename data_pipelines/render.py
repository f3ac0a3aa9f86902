"""One prompt, rendered once, for both consumers: the vLLM rollout engine and the learner.

How vLLM 0.31 treats a token-id prompt with `multi_modal_data` (read in
vllm/multimodal/processing/processor.py and model_executor/models/qwen2_vl.py): it runs the HF
image processor on the images, then *replaces each single* `<|image_pad|>` token of the prompt with
`grid_t * grid_h * grid_w / merge_size**2` copies of it (`PromptReplacement(target=[image_pad])`,
matched once per image). It does not accept pre-expanded prompts: a run of pads would be expanded
again. So:

- vLLM gets the chat-templated prompt with one `<|image_pad|>` per image, as token ids, plus the
  images (already resized here, so the processor leaves their size alone);
- the learner gets the same token ids with each pad expanded by the same rule, from the grid the
  same image processor reports, plus `pixel_values` / `image_grid_thw`.

Both id lists come from one tokenization of one text, so they agree by construction; a test checks
it against a real `vllm.LLM` (RequestOutput.prompt_token_ids).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from data_pipelines.config import DataConfig
from data_pipelines.images import load_image, resize_for_vision, vision_budget
from data_pipelines.templates import build_messages, count_image_markers


class RenderError(ValueError):
    """A row that cannot be rendered for this model (a bad-row reason for the caller)."""


@dataclasses.dataclass
class RenderedPrompt:
    row_id: str
    expert: str
    text: str  # the chat-templated prompt, one image placeholder per image
    prompt_token_ids: list[int]  # the learner's input ids: image placeholders expanded exactly as vLLM expands them
    vllm_input: dict  # for vllm.LLM.generate: {"prompt_token_ids": [...]} (+ "multi_modal_data": {"image": [PIL images]})
    mm_inputs: dict = dataclasses.field(default_factory=dict)  # learner tensors: pixel_values [patches, dim], image_grid_thw [images, 3]
    mm_token_type_ids: Optional[list[int]] = None  # 1 at image tokens of prompt_token_ids (Qwen2.5-VL's 3D rope needs it; pad responses with 0)
    images: list = dataclasses.field(default_factory=list)  # the resized RGB PIL images

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


def is_multimodal(processor_or_tokenizer: Any) -> bool:
    """A processor with an image processor (Qwen2.5-VL) rather than a bare tokenizer."""
    return hasattr(processor_or_tokenizer, "image_processor") and hasattr(processor_or_tokenizer, "tokenizer")


def tokenizer_of(processor_or_tokenizer: Any):
    return processor_or_tokenizer.tokenizer if is_multimodal(processor_or_tokenizer) else processor_or_tokenizer


def render_prompt(row: dict, expert: str, processor_or_tokenizer: Any, cfg: Optional[DataConfig] = None,
                  with_pixels: bool = True) -> RenderedPrompt:
    """Template `row` for `expert` with the model's own chat template; return both vLLM's and the learner's inputs.

    `with_pixels=False` skips the pixel tensors (`mm_inputs`) but still sizes the images and expands
    their placeholders, for cheap length checks. Raises RenderError (a bad-row reason) or ImageLoadError.
    """
    cfg = cfg or DataConfig()
    multimodal = is_multimodal(processor_or_tokenizer)
    tokenizer = tokenizer_of(processor_or_tokenizer)
    refs = list(row.get("images") or [])
    if refs and not multimodal:
        raise RenderError(f"the row has {len(refs)} image(s) but the model is text-only (no image processor)")
    markers = count_image_markers(row)
    if markers and markers != len(refs):
        raise RenderError(f"the prompt has {markers} <image> marker(s) but the row has {len(refs)} image(s)")

    messages = build_messages(row, expert, cfg.template, cfg.few_shot, with_images=multimodal)
    text = processor_or_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    rendered = RenderedPrompt(row_id=row.get("id"), expert=expert, text=text, prompt_token_ids=ids,
                              vllm_input={"prompt_token_ids": ids})
    if not multimodal:
        return rendered

    image_processor = processor_or_tokenizer.image_processor
    lo, hi, factor = vision_budget(image_processor, cfg.min_pixels, cfg.max_pixels)
    images = [resize_for_vision(load_image(ref), lo, hi, factor) for ref in refs]
    pad_id = tokenizer.convert_tokens_to_ids(processor_or_tokenizer.image_token)
    if ids.count(pad_id) != len(images):
        raise RenderError(f"the templated prompt holds {ids.count(pad_id)} image placeholder(s) for {len(images)} image(s)")
    if not images:
        rendered.mm_token_type_ids = [0] * len(ids)
        return rendered

    merge = image_processor.merge_size ** 2
    if with_pixels:
        mm = image_processor(images=images, return_tensors="pt")
        rendered.mm_inputs = {"pixel_values": mm["pixel_values"], "image_grid_thw": mm["image_grid_thw"]}
        counts = [int(g.prod()) // merge for g in mm["image_grid_thw"]]
    else:  # the processor's grid of a conforming image is its size in patches
        patch = image_processor.patch_size
        counts = [(im.height // patch) * (im.width // patch) // merge for im in images]
    expanded, types, k = [], [], 0
    for t in ids:
        if t == pad_id:
            expanded += [pad_id] * counts[k]
            types += [1] * counts[k]
            k += 1
        else:
            expanded.append(t)
            types.append(0)
    rendered.prompt_token_ids, rendered.mm_token_type_ids, rendered.images = expanded, types, images
    rendered.vllm_input = {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
    return rendered


def response_token_ids(processor_or_tokenizer: Any, response: str) -> list[int]:
    """Token ids of an assistant response followed by the end-of-turn token (the supervised target of SFT)."""
    tokenizer = tokenizer_of(processor_or_tokenizer)
    return list(tokenizer.encode(response, add_special_tokens=False)) + [tokenizer.eos_token_id]


def batch_mm_inputs(prompts: list[RenderedPrompt]) -> dict:
    """The learner's image tensors for a batch: pixel_values and image_grid_thw concatenated in prompt order."""
    import torch

    with_images = [p.mm_inputs for p in prompts if p.mm_inputs]
    if not with_images:
        return {}
    return {key: torch.cat([m[key] for m in with_images]) for key in ("pixel_values", "image_grid_thw")}
