"""Tiny random models with real tokenizers and processors, built offline, for tests and quick demos.

Nothing can be downloaded here, so a tiny byte-level BPE tokenizer is trained on a fixed corpus
(deterministic) and given a ChatML template that knows image items, as Qwen2.5-VL's does.
Head sizes are 32 because vLLM's CPU attention supports 32, 64, 80, ... but not 16.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
ARCHS = ("qwen2", "llama", "qwen2_5_vl")


def _corpus() -> list[str]:
    words = ("the answer is what how many shapes colour color red green blue circle square triangle "
             "think reason step first then so total sum plus minus times add multiply result question "
             "system user assistant you are a helpful model image text word number code field copy").split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(0, 100, 7) for b in range(0, 30, 3)]
    lines += ["<think>First add. Then multiply.</think><answer>42</answer>", "<think></think><answer>red</answer>"]
    lines += ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?()[]{}<>/\\=+-*%$#@&'\"\n"]
    return lines


def build_tokenizer(vocab_size: int = 640) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML and Qwen-VL special tokens (same result every call)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, num_layers: int = 2, context: int = 2048) -> Path:
    """Write a tiny random `arch` model (fp32) with tokenizer (and processor for VL) to out_dir; `context`: its
    max_position_embeddings."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHS}")
    out = Path(out_dir)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                initializer_range=0.1,  # peaky logits: greedy decoding is not decided by rounding noise
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**text, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "llama":
        config = transformers.LlamaConfig(**text, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], window_size=112, initializer_range=0.1)
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False,
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if arch == "qwen2_5_vl":
        build_vl_processor(tok).save_pretrained(out)
    return out


def build_vl_processor(tok: transformers.PreTrainedTokenizerFast,
                       min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 64) -> transformers.ProcessorMixin:
    """A Qwen2.5-VL processor around `tok`, sized so a small image is a few dozen patches."""
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = transformers.Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return transformers.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)
