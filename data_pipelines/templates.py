"""Prompt templates per expert, few-shot example turns, and the target response format.

Both experts answer in one output format (Metis-HOME):
    think: <think>…reasoning…</think><answer>…</answer>
    fast:  <think></think><answer>…</answer>
A template is a system prompt per expert plus a few worked examples. The default model is a 135M
one, so the wording is short and plain, and the examples use the same phrasing as the synthetic
families. With `few_shot=k`, the first k examples go before the question as earlier chat turns, the
assistant turns written in the expert's own format: measured on SmolLM2-135M-Instruct, a system
prompt alone gave 0 well-formed answers in 1,536 samples, two example exchanges 77-95%.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from home_rl.errors import ConfigError

from home_rl.experts import EXPERTS, FAST, THINK
IMAGE_MARKER = "<image>"  # where an image goes inside prompt text (verl's convention); otherwise images lead the question

_SYSTEM = {
    THINK: "You are a helpful assistant. Think step by step inside <think></think>, "
           "then give the final answer inside <answer></answer>.",
    FAST: "You are a helpful assistant. Answer at once: write <think></think>, "
          "then give the final answer inside <answer></answer>.",
}


@dataclasses.dataclass(frozen=True)
class Example:
    question: str
    think: str  # the worked reasoning (what goes inside <think> for the think expert)
    answer: str


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: dict  # expert -> system prompt
    examples: tuple  # Examples for few-shot turns, in the order they are used


_GENERAL = (
    Example("What is 7 + 5?", "7 + 5 = 12.", "12"),
    Example("What colour is grass?", "Grass is green.", "green"),
    Example("Ben has 9 cups. He gives away 4. How many cups does Ben have now?", "9 - 4 = 5.", "5"),
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("default", _SYSTEM, _GENERAL),
    Template("math", _SYSTEM, (
        Example("Ann has 5 pens. Then she gets 3 more. Then she gives away 2. How many pens does Ann have now?",
                "gets 3 more: 5 + 3 = 8. gives away 2: 8 - 2 = 6.", "6"),
        Example("Tom has 4 cards. Then he has 3 times as many. How many cards does Tom have now?",
                "has 3 times as many: 4 * 3 = 12.", "12"),
        Example("Mia has 12 shells. Then she gives away 5. Then she gets 6 more. Then she has 2 times as many. "
                "How many shells does Mia have now?", "gives away 5: 12 - 5 = 7. gets 6 more: 7 + 6 = 13. has 2 times as many: 13 * 2 = 26.", "26"),
    )),
    Template("arith", _SYSTEM, (
        Example("What is 7 + 5?", "7 + 5 = 12.", "12"),
        Example("Compute 23 - 8.", "23 - 8 = 15.", "15"),
        Example("Calculate 14 * 3.", "14 * 3 = 42.", "42"),
    )),
    Template("extract", _SYSTEM, (
        Example("Which word comes after lamp in this list: blue lamp sits low", "After lamp comes sits.", "sits"),
        Example("Copy this code exactly: K7P-42", "The code is K7P-42.", "K7P-42"),
        Example("Record: name=Ana; age=31; city=Lima. What is the city?", "The field city is Lima.", "Lima"),
    )),
    Template("ocr", _SYSTEM, _GENERAL),
    Template("vqa", _SYSTEM, _GENERAL),
)}


def format_response(expert: str, answer: str, think: str = "") -> str:
    """The complete response text an expert should write: `<think>…</think><answer>…</answer>`."""
    _check_expert(expert)
    return f"<think>{think if expert == THINK else ''}</think><answer>{answer}</answer>"


def target_response(row: dict, expert: str) -> str:
    """The supervised target for `row` in `expert`'s format, from its reference `solution`.

    The fast expert needs only an answer (the row's first accepted answer when there is no solution);
    the think expert needs the worked trace of `solution["think"]`.
    """
    solution = solution_of(row)
    answer = solution.get("answer")
    if answer is None:
        answer = row["answer"][0] if isinstance(row.get("answer"), list) else row.get("answer")
    if answer is None:
        raise ValueError(f"row {row.get('id')!r} has neither a solution nor an answer")
    if expert == THINK and not solution.get("think"):
        raise ValueError(f"row {row.get('id')!r} has no solution['think'] trace for the think expert")
    return format_response(expert, str(answer), solution.get("think", ""))


def solution_of(row: dict) -> dict:
    """A row's reference solution as {think, answer}: a string solution (TRL's column) is an answer only."""
    solution = row.get("solution")
    if isinstance(solution, str):
        return {"answer": solution}
    return solution if isinstance(solution, dict) else {}


def template_name(row: dict, configured: str) -> str:
    """Which template renders `row`: the configured one, else the row's extra_info.template, its data_source, or default."""
    if configured != "auto":
        return configured
    name = (row.get("extra_info") or {}).get("template")
    if name:
        return name
    return row.get("data_source") if row.get("data_source") in TEMPLATES else "default"


def build_messages(row: dict, expert: str, template: str = "auto", few_shot: int = 0,
                   with_images: bool = False) -> list[dict]:
    """Chat messages for `row` as `expert` should see them.

    `template="row"` uses the row's own messages unchanged (no system prompt, no examples); a system
    message of the row is otherwise appended to the template's. Images: each `<image>` marker in the
    question becomes an image item; without markers, all images lead the row's first user message.
    `with_images=False` (a text-only model) keeps every content a plain string.
    """
    _check_expert(expert)
    question = [{"role": m["role"], "content": text_of(m["content"])} for m in as_messages(row.get("prompt"))]
    name = template_name(row, template)
    if name == "row":
        context, question_turns = [], question
    else:
        if name not in TEMPLATES:
            raise ConfigError(f"unknown prompt template {name!r} (row {row.get('id')!r}); "
                              f"known: auto, row, {', '.join(TEMPLATES)}")
        chosen = TEMPLATES[name]
        if few_shot > len(chosen.examples):
            raise ConfigError(f"data.few_shot={few_shot} but template {name!r} has {len(chosen.examples)} examples")
        own_system = [m["content"] for m in question if m["role"] == "system"]
        context = [{"role": "system", "content": "\n".join([chosen.system[expert]] + own_system)}]
        for ex in chosen.examples[:few_shot]:
            context.append({"role": "user", "content": ex.question})
            context.append({"role": "assistant", "content": format_response(expert, ex.answer, ex.think)})
        question_turns = [m for m in question if m["role"] != "system"]
    if with_images:
        question_turns = _place_images(question_turns, len(row.get("images") or []))
    return context + question_turns


def count_image_markers(row: dict) -> int:
    return sum(text_of(m["content"]).count(IMAGE_MARKER) for m in as_messages(row.get("prompt")))


def as_messages(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError("prompt must be text or a list of chat messages with 'role' and 'content'")


def _place_images(turns: list[dict], n_images: int) -> list[dict]:
    """Turn string contents into [image, text] parts: at `<image>` markers, else before the first user text."""
    has_markers = any(IMAGE_MARKER in m["content"] for m in turns)
    first_user = next((i for i, m in enumerate(turns) if m["role"] == "user"), 0)
    out = []
    for i, m in enumerate(turns):
        content = m["content"]
        if has_markers:
            parts = re.split(f"({re.escape(IMAGE_MARKER)})", content)
            content = [{"type": "image"} if p == IMAGE_MARKER else {"type": "text", "text": p} for p in parts if p]
        elif i == first_user and n_images:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": content}]
        out.append({"role": m["role"], "content": content})
    return out


def text_of(content: Any) -> str:
    """A message content as one string; image parts of a list content become `<image>` markers."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if p.get("type") == "text" else IMAGE_MARKER * (p.get("type") == "image")
                       for p in content if isinstance(p, dict))
    return str(content)


def _check_expert(expert: Optional[str]) -> None:
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; expected one of {EXPERTS}")
