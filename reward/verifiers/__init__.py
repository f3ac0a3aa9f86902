"""The built-in verifiers; importing this package registers them (math, vqa, ocr, format, choice)."""
from reward.verifiers import math_equal, multiple_choice, ocr_match, output_format, vqa_match  # noqa: F401
