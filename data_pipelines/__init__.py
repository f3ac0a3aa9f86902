"""Data for home-rl: the row schema and its readers, prompt templates per expert, image handling,
bad-row policy, the resumable prompt loader, and offline synthetic data (`data_pipelines.synthetic`)."""
from data_pipelines.config import DataConfig
from data_pipelines.dataset import BadRowReport, LoadedData, check_row, load_dataset
from data_pipelines.images import ImageLoadError, load_image, resize_for_vision
from data_pipelines.loader import PromptLoader
from data_pipelines.readers import Origin, Splits, find_splits, iter_located, iter_rows, read_rows
from data_pipelines.render import (RenderedPrompt, RenderError, batch_mm_inputs, is_multimodal, render_prompt,
                                   response_token_ids)
from data_pipelines.schema import BadRowError
from data_pipelines.templates import (EXPERTS, FAST, TEMPLATES, THINK, build_messages, format_response,
                                      target_response)

__all__ = ["DataConfig", "BadRowReport", "LoadedData", "check_row", "load_dataset", "ImageLoadError", "load_image",
           "resize_for_vision", "PromptLoader", "Origin", "Splits", "find_splits", "iter_located", "iter_rows",
           "read_rows", "RenderedPrompt", "RenderError",
           "batch_mm_inputs", "is_multimodal", "render_prompt", "response_token_ids", "BadRowError", "EXPERTS",
           "FAST", "THINK", "TEMPLATES", "build_messages", "format_response", "target_response"]
