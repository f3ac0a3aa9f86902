"""Prompt templates and rendering: the learner and a real vLLM engine see the same prompt tokens."""
from __future__ import annotations

import gc
import io

import pytest
import torch
import transformers
from PIL import Image

from data_pipelines import (DataConfig, RenderError, batch_mm_inputs, build_messages, format_response,
                            render_prompt, response_token_ids, target_response)
from data_pipelines.templates import TEMPLATES
from home_rl.errors import ConfigError


def png(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def text_rows() -> list[dict]:
    return [
        {"id": "t1", "data_source": "math", "prompt": "Ann has 3 pens. Then she gets 4 more. How many pens does Ann have now?",
         "images": [], "answer": "7", "extra_info": {}},
        {"id": "t2", "data_source": "extract", "prompt": "Copy this code exactly: AB-12", "images": [], "answer": "AB-12",
         "extra_info": {}},
        {"id": "t3", "data_source": "gsm8k", "images": [], "answer": "5", "extra_info": {},
         "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]},
    ]


def image_rows(tmp_path) -> list[dict]:
    (tmp_path / "wide.png").write_bytes(png("red", (300, 90)))
    return [
        {"id": "v1", "data_source": "vqa", "prompt": "What colour is the shape?", "images": [png("blue", (64, 64))],
         "answer": "blue", "extra_info": {}},
        {"id": "v2", "data_source": "ocr", "prompt": "What text is in the image?", "images": [str(tmp_path / "wide.png")],
         "answer": "x", "extra_info": {}},
        {"id": "v3", "data_source": "geo", "answer": "12", "extra_info": {}, "images": [png("white", (500, 400)), png("black", (30, 30))],
         "prompt": [{"role": "user", "content": "Compare <image> with <image>: which is darker?"}]},
        text_rows()[0],  # a text-only row through the processor
    ]


# ----------------------------------------------------------------------------- templates


def test_format_and_target_response():
    assert format_response("think", "14", "3 + 4 = 7. 7 * 2 = 14.") == "<think>3 + 4 = 7. 7 * 2 = 14.</think><answer>14</answer>"
    assert format_response("fast", "14", "ignored") == "<think></think><answer>14</answer>"
    row = {"id": "r", "answer": ["9", "nine"], "solution": {"think": "4 + 5 = 9.", "answer": "9"}}
    assert target_response(row, "think") == "<think>4 + 5 = 9.</think><answer>9</answer>"
    assert target_response({"id": "r", "answer": ["9", "nine"]}, "fast") == "<think></think><answer>9</answer>"
    with pytest.raises(ValueError, match="no solution"):
        target_response({"id": "r", "answer": "9"}, "think")
    with pytest.raises(ValueError, match="unknown expert"):
        format_response("slow", "1")


def test_messages_per_expert_with_few_shot():
    row = text_rows()[0]
    think = build_messages(row, "think", few_shot=2)
    fast = build_messages(row, "fast", few_shot=2)
    assert [m["role"] for m in think] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Think step by step" in think[0]["content"] and "Answer at once" in fast[0]["content"]
    math_examples = TEMPLATES["math"].examples
    assert think[1]["content"] == math_examples[0].question
    assert think[2]["content"] == f"<think>{math_examples[0].think}</think><answer>{math_examples[0].answer}</answer>"
    assert fast[2]["content"] == f"<think></think><answer>{math_examples[0].answer}</answer>"
    assert think[-1] == {"role": "user", "content": row["prompt"]}
    assert len(build_messages(row, "think")) == 2  # few_shot=0: system + question


def test_template_choice_row_system_and_errors():
    row = text_rows()[2]  # data_source gsm8k has no template of its own: default, with the row's system prompt kept
    messages = build_messages(row, "think", few_shot=1)
    assert messages[0]["content"].endswith("\nBe brief.") and messages[1]["content"] == TEMPLATES["default"].examples[0].question
    assert build_messages(row, "think", template="row") == row["prompt"]  # unchanged
    row_with_choice = dict(text_rows()[1], extra_info={"template": "math"})
    assert build_messages(row_with_choice, "fast", few_shot=1)[1]["content"] == TEMPLATES["math"].examples[0].question
    with pytest.raises(ConfigError, match="unknown prompt template 'nope'"):
        build_messages(row, "think", template="nope")
    with pytest.raises(ConfigError, match="few_shot=9"):
        build_messages(row, "think", few_shot=9)


def test_text_model_render(tiny_model):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    cfg = DataConfig(few_shot=2)
    rendered = render_prompt(text_rows()[0], "think", tok, cfg)
    assert rendered.text.startswith("<|im_start|>system\nYou are a helpful assistant. Think step by step")
    assert rendered.text.endswith("How many pens does Ann have now?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.text.count("<|im_start|>assistant") == 3  # two example answers, then the generation prompt
    assert rendered.prompt_token_ids == tok.encode(rendered.text, add_special_tokens=False)
    assert rendered.vllm_input == {"prompt_token_ids": rendered.prompt_token_ids}
    assert rendered.mm_inputs == {} and rendered.mm_token_type_ids is None
    response = response_token_ids(tok, format_response("fast", "7"))
    assert response[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(response[:-1]) == "<think></think><answer>7</answer>"
    with pytest.raises(RenderError, match="text-only"):
        render_prompt(dict(text_rows()[0], images=[png("red", (8, 8))]), "think", tok, cfg)


def test_learner_inputs_match_hf_processor_and_run_the_model(tiny_model, tmp_path):
    """Our expansion equals the HF processor's own, and the tiny Qwen2.5-VL forward accepts the learner inputs."""
    folder = tiny_model("qwen2_5_vl")
    proc = transformers.AutoProcessor.from_pretrained(folder)
    cfg = DataConfig(max_pixels=28 * 28 * 16)
    rendered = [render_prompt(r, "think", proc, cfg) for r in image_rows(tmp_path)]
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for r in rendered:
        hf = proc(text=[r.text], images=r.images or None, return_tensors="pt")
        assert hf["input_ids"][0].tolist() == r.prompt_token_ids
        assert r.mm_token_type_ids == [int(t == pad) for t in r.prompt_token_ids]
        assert r.vllm_input["prompt_token_ids"].count(pad) == len(r.images)  # one placeholder per image for vLLM
        for image in r.images:
            assert image.width % 28 == 0 and image.height % 28 == 0 and image.width * image.height <= 28 * 28 * 16
        cheap = render_prompt(next(x for x in image_rows(tmp_path) if x["id"] == r.row_id), "think", proc, cfg,
                              with_pixels=False)
        assert cheap.prompt_token_ids == r.prompt_token_ids and cheap.mm_inputs == {}
    two = rendered[2]
    assert two.mm_inputs["image_grid_thw"].shape == (2, 3)
    assert two.text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert "Compare <|vision_start|>" in two.text  # the <image> markers place the images

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([two.prompt_token_ids]),
                    mm_token_type_ids=torch.tensor([two.mm_token_type_ids]), **two.mm_inputs)
    assert out.logits.shape[1] == len(two.prompt_token_ids) and torch.isfinite(out.logits).all()
    batch = batch_mm_inputs(rendered)
    assert batch["image_grid_thw"].shape[0] == 4
    assert batch["pixel_values"].shape[0] == sum(int(g.prod()) for g in batch["image_grid_thw"])


def test_image_marker_mismatch_is_a_render_error(tiny_model):
    proc = transformers.AutoProcessor.from_pretrained(tiny_model("qwen2_5_vl"))
    row = {"id": "m", "data_source": "x", "prompt": "<image> and <image>?", "images": [png("red", (40, 40))], "answer": "a"}
    with pytest.raises(RenderError, match="2 <image> marker"):
        render_prompt(row, "fast", proc)


# ----------------------------------------------------------------------------- a real vLLM engine


@pytest.fixture(scope="module", params=["qwen2", "qwen2_5_vl"])
def engine(request, tiny_model):
    """One in-process vLLM engine per architecture for this module (the two never exist at once)."""
    import vllm

    folder = tiny_model(request.param)
    extra = {"limit_mm_per_prompt": {"image": 2}} if request.param == "qwen2_5_vl" else {}
    llm = vllm.LLM(str(folder), enforce_eager=True, dtype="float32", max_model_len=1024, seed=0, **extra)
    processor = (transformers.AutoProcessor if request.param == "qwen2_5_vl" else transformers.AutoTokenizer
                 ).from_pretrained(folder)
    yield request.param, llm, processor
    del llm
    gc.collect()


def test_vllm_and_learner_see_the_same_prompt_tokens(engine, tmp_path):
    import vllm

    arch, llm, processor = engine
    rows = image_rows(tmp_path) if arch == "qwen2_5_vl" else text_rows()
    cfg = DataConfig(few_shot=2, max_pixels=28 * 28 * 16)
    rendered = [render_prompt(r, expert, processor, cfg) for r in rows for expert in ("think", "fast")]
    outputs = llm.generate([r.vllm_input for r in rendered], vllm.SamplingParams(max_tokens=1, temperature=0.0),
                           use_tqdm=False)
    for r, out in zip(rendered, outputs):
        assert list(out.prompt_token_ids) == r.prompt_token_ids, (arch, r.row_id, r.expert)
    if arch == "qwen2_5_vl":  # the images really went through vLLM's multimodal path
        pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert sum(list(o.prompt_token_ids).count(pad) for o in outputs) > 2 * len(rows)
