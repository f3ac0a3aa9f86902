"""Images: load (file or bytes), convert to RGB, resize into the pixel budget that Qwen2.5-VL expects.

Qwen2.5-VL cuts an image into 14x14 patches and merges 2x2 of them into one token, so both sides
must be multiples of 28 and the area must lie within [min_pixels, max_pixels]. We resize here, once,
with the processor's own `smart_resize`; the processor then finds a conforming image and leaves its
size alone, so the learner and vLLM (which runs the same processor) count the same image tokens.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from PIL import Image

DEFAULT_FACTOR = 28  # patch_size 14 x merge_size 2


class ImageLoadError(Exception):
    """An image that is missing or cannot be decoded (turned into a bad-row reason by the caller)."""


def load_image(ref: str | bytes | Path) -> Image.Image:
    """Decode an image from a file path or encoded bytes, fully, as RGB."""
    try:
        if isinstance(ref, (bytes, bytearray)):
            image = Image.open(io.BytesIO(ref))
        else:
            if not Path(ref).is_file():
                raise ImageLoadError(f"image file not found: {ref}")
            image = Image.open(ref)
        image.load()  # decode now: a truncated file fails here rather than inside the processor
    except ImageLoadError:
        raise
    except Exception as e:
        what = f"{len(ref)} image bytes" if isinstance(ref, (bytes, bytearray)) else f"image {ref}"
        raise ImageLoadError(f"cannot decode {what}: {e}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_size(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = DEFAULT_FACTOR) -> tuple[int, int]:
    """(height, width) with sides multiples of `factor` and area in [min_pixels, max_pixels] (Qwen2-VL's rule)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:  # aspect ratio above 200
        raise ImageLoadError(str(e)) from None


def resize_for_vision(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = DEFAULT_FACTOR) -> Image.Image:
    """The image resized (bicubic, as the processor does) into the pixel budget; unchanged if it already fits."""
    height, width = fit_size(image.height, image.width, min_pixels, max_pixels, factor)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


def vision_budget(image_processor, min_pixels: Optional[int], max_pixels: Optional[int]) -> tuple[int, int, int]:
    """(min_pixels, max_pixels, factor) from the config, falling back to the processor's own settings.

    The budget is clamped into the processor's range: the processor would otherwise resize again, and
    a second resize would still agree between learner and vLLM but not with what the config says.
    """
    factor = image_processor.patch_size * image_processor.merge_size
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    proc_min = get("shortest_edge") or getattr(image_processor, "min_pixels", None) or factor * factor
    proc_max = get("longest_edge") or getattr(image_processor, "max_pixels", None) or proc_min
    lo = proc_min if min_pixels is None else max(min_pixels, proc_min)
    hi = proc_max if max_pixels is None else min(max_pixels, proc_max)
    return lo, max(lo, hi), factor
