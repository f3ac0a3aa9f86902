"""What would make a config work: the knobs named when an actor does not fit, biggest part first, and the lengths
that cannot work against the model's context (always refused)."""
from __future__ import annotations

from typing import Any, Optional

from home_rl.memory_plan.run import Run
from home_rl.memory_plan.shapes import ModelShape


def length_problems(shape: ModelShape, run: Run) -> list[str]:
    """Lengths that cannot work against the model's context: refused before any actor starts."""
    out = []
    rollout = run.rollout
    if rollout is not None and shape.context and rollout.max_model_len > shape.context:
        out.append(f"rollout.max_model_len={rollout.max_model_len} is above the model's context of {shape.context} "
                   f"tokens (max_position_embeddings in {shape.path}/config.json): lower rollout.max_model_len")
    if rollout is not None and run.on_long_prompt == "error" and \
            run.prompt_tokens + rollout.max_response_tokens > rollout.max_model_len:
        out.append(f"data.max_prompt_tokens={run.prompt_tokens} + rollout.max_response_tokens="
                   f"{rollout.max_response_tokens} = {run.prompt_tokens + rollout.max_response_tokens} is above "
                   f"rollout.max_model_len={rollout.max_model_len}: a long prompt would stop the run midway; lower "
                   f"data.max_prompt_tokens, raise rollout.max_model_len, or set rollout.on_long_prompt=truncate|skip")
    if rollout is None and run.learner is not None and shape.context and \
            run.prompt_tokens + run.response_tokens > shape.context:
        out.append(f"data.max_prompt_tokens={run.prompt_tokens} + {run.response_tokens} response tokens is above "
                   f"the model's context of {shape.context} tokens (max_position_embeddings in {shape.path}/config.json)")
    return out


def learner_advice(learner: Any, stage: int, on_gpu: bool, parts: dict[str, float]) -> str:
    """The knobs that shrink a learner's largest parts, biggest first."""
    knobs = []
    mask = parts.get("attention_mask", 0.0)
    if mask > 0.1 * sum(parts.values()):  # long shared rows: their mask grows with the square of the row
        knobs.append("set learner.shared_prefix=false")
    by_token = parts["activations"] + parts["logits"] + mask
    state = parts["weights"] + parts["gradients"] + parts["optimizer"]
    budget = int(getattr(learner, "max_tokens_per_micro_batch", 0) or 0)
    if budget:
        micro = f"lower learner.max_tokens_per_micro_batch (now {budget})"
    elif hasattr(learner, "max_tokens_per_micro_batch"):
        micro = f"lower learner.micro_batch_size (now {learner.micro_batch_size}) or set learner.max_tokens_per_micro_batch"
    else:
        micro = f"lower learner.micro_batch_size (now {learner.micro_batch_size})"
    if by_token >= state:
        knobs.append(micro)
        if not learner.gradient_checkpointing:
            knobs.append("set learner.gradient_checkpointing=true")
    if stage < 3:
        knobs.append("raise learner.zero_stage (or auto)")
    knobs.append(f"raise learner.num_learners (now {learner.num_learners})")
    if by_token < state:
        knobs.append(micro)
    return "fix: " + ", or ".join(knobs)


def host_advice(run: Run, stage: Optional[int]) -> str:
    """The knobs that shrink what a node's RAM holds."""
    knobs = []
    if run.learner is not None and stage is not None and stage < 3:
        knobs.append("learner.zero_stage=3 (each learner then loads its partition only)")
    if run.rollout is not None:
        knobs.append("lower rollout.kv_cache_gib or rollout.num_workers")
    if run.learner is not None:
        knobs.append("lower learner.micro_batch_size or learner.num_learners")
    return "host RAM: " + ", or ".join(knobs) + ", or add nodes"
