"""Text rendered into PNG images, byte-identical for the same input (PIL's built-in font, no timestamps)."""
from __future__ import annotations

import io
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # PIL's embedded font: works offline, same glyphs everywhere


def wrap(text: str, font_size: int, max_width: int) -> list[str]:
    """Greedy word wrap so that no line is wider than `max_width` pixels."""
    font, lines, line = _font(font_size), [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > max_width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def text_image(text: str, font_size: int = 24, max_width: int = 0, padding: int = 12) -> bytes:
    """PNG bytes of black `text` on white, wrapped to `max_width` pixels when given."""
    font = _font(font_size)
    lines = wrap(text, font_size, max_width) if max_width else [text]
    line_height = int(font_size * 1.3)
    width = int(max(font.getlength(line) for line in lines)) + 2 * padding
    height = line_height * len(lines) + 2 * padding
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((padding, padding + i * line_height), line, fill="black", font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
