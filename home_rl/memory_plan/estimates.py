"""Per-actor byte estimates: what one learner or rollout engine holds at its peak, part by part, and the constants
behind them (each says why it is what it is: most were measured on the 2-core CPU machine as peak RSS, VmHWM, of the
actor processes; benchmarks/memory_plan.py prints prediction against measurement for the embedded default)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from home_rl.memory_plan.nodes import GIB
from home_rl.memory_plan.run import Run
from home_rl.memory_plan.shapes import ModelShape

if TYPE_CHECKING:
    from home_rl.learner.config import LearnerConfig
    from home_rl.rollout.config import RolloutConfig

# A learner actor with torch, deepspeed, transformers and verl imported, before any weight: VmHWM of a bare Ray
# actor importing the same modules, 0.52 GiB (benchmarks/memory_plan.py, case "baseline").
LEARNER_BASELINE_GIB = 0.52
# A vLLM rollout actor before weights and KV cache (vLLM's import, its engine core, the CPU build's buffers): the
# smollm2 view's worker peaked at 3.13 GiB with its 0.25 GiB of bf16 weights and its 2 GiB KV cache (allocated
# zeroed, so resident from the start).
ROLLOUT_BASELINE_GIB = 0.85
# The driver: Ray's client, the processor and the data rows. A tiny-model GRPO driver ran at 0.49 GB RSS and the
# benchmark's driver (the same imports) at 0.65 GB; a real data set's rows add to it.
# Learner rank 0 sends the weights through vLLM's weight-transfer API: importing it (vllm.config and what it pulls
# in) added 247 MB to a learner process with torch, deepspeed, transformers and verl imported (measured).
WEIGHT_SENDER_GIB = 0.25
DRIVER_BASELINE_GIB = 0.8
# A reward worker: Ray's worker, math-verify and its sandbox processes (small; not the memory that matters).
REWARD_WORKER_GIB = 0.4
# CUDA context, NCCL and the caching allocator's slack of a GPU process (no GPU here to measure: the usual
# figure for recent CUDA, ~1 GiB of context plus fragmentation).
GPU_CONTEXT_GIB = 1.5
# vLLM's activation reserve on a GPU (its profile run, sampler and CUDA graphs) out of gpu_memory_utilization.
VLLM_GPU_ACTIVATIONS_GIB = 2.0
# What one decoder layer saves for backward per token, in elements: the residual stream, both norms' outputs,
# q, the attention output and o_proj's input (about 8 x hidden), k and v (2 x kv_dim), and the MLP's gate, up,
# activation and product (4 x intermediate). Measured on smollm2 HOME (hidden 576, MLP 1536, 30 layers, fp32, ZeRO-0):
# each 256-token row of a micro-batch raised the peak by 0.535 GiB, with gradient checkpointing by 0.24 GiB; the
# difference, 0.295 GiB, is what checkpointing does not keep: 0.29 GiB as counted here (11.1 k elements a token).
ACT_HIDDEN_ELEMS, ACT_MLP_ELEMS = 8, 4
# With gradient checkpointing each layer keeps only its input (hidden elements per token); one layer at a
# time is recomputed whole during backward.
CKPT_HIDDEN_ELEMS = 1
# fp32 [positions, vocab] tensors at the peak for the logits of the kept positions, in units of one copy: the
# logits, the loss's and the entropy metric's softmax-sized intermediates, the gradient of the logits and the LM
# head's backward. Measured on smollm2 (vocab 49152, 160 kept positions a row): with gradient checkpointing a row
# added 0.24 GiB at the peak, 0.03 GiB of it activations: about 6 copies of its logits.
LOGIT_COPIES = 6
# DeepSpeed's gradient buckets: ZeRO 1-3 reduce in buckets of 5e7 elements (deepspeed_config sets it), one bucket
# and its flattened copy; stage 0 all-reduces a flattened copy of every gradient (its buckets are 5e8 elements).
REDUCE_BUCKET_ELEMS = int(5e7)
REDUCE_BUCKET_COPIES = 2
ALLREDUCE_BUCKET_ELEMS = int(5e8)
# ZeRO-3 prefetches parameters in buckets of stage3_prefetch_bucket_size (DeepSpeed's default 5e7 elements).
PREFETCH_BUCKET_ELEMS = int(5e7)
# ZeRO-3 keeps up to stage3_max_live_parameters (DeepSpeed's default 1e9) gathered parameters resident, and does not
# release one reused within stage3_max_reuse_distance (1e9): a model under 1e9 parameters stays gathered whole
# between forward and backward (measured: at the same micro-batch, ZeRO-3's smollm2 learners peaked 1.5 GiB above
# ZeRO-0's, although their weights were partitioned in two).
MAX_LIVE_PARAMS = int(1e9)
# Tokens of one image at Qwen2.5-VL's usual cap (max_pixels 1280 x 28 x 28), and vLLM's encoder cache budget in
# tokens (its max_num_batched_tokens default): the multimodal buffers of a rollout engine, small beside its KV cache.
IMAGE_TOKENS, ENCODER_CACHE_TOKENS = 1280, 8192


def learner_parts(shape: ModelShape, learner: LearnerConfig, stage: int, dtype_bytes: int,
                  run: Run) -> dict[str, float]:
    """GiB per part of one learner's peak on its device (a GPU, or the host on CPU), and the host RAM of loading."""
    w = learner.num_learners
    b = dtype_bytes
    # AdamW's m + v (fp32), and an fp32 master copy of what trains: ZeRO's optimizers keep one whatever the dtype,
    # stage 0 only in 16-bit training (DeepSpeed's bf16 optimizer; fp32 runs torch's AdamW on the weights)
    optim_bytes = 12 if b < 4 or stage >= 1 else 8
    parts = {
        "weights": shape.params * b / (w if stage == 3 else 1),
        # ZeRO-3 also keeps the fp32 gradient partition its optimizer steps on
        "gradients": shape.trainable * (b + (4 if stage == 3 else 0)) / (w if stage >= 2 else 1),
        "optimizer": shape.trainable * optim_bytes / (w if stage >= 1 else 1),
        "gathered": min(shape.params, max(shape.largest_layer, MAX_LIVE_PARAMS)) * b if stage == 3 else 0.0,
        "buckets": (min(REDUCE_BUCKET_ELEMS, shape.trainable) * REDUCE_BUCKET_COPIES if stage >= 1
                    else min(ALLREDUCE_BUCKET_ELEMS, shape.trainable)) * b
                   + (min(PREFETCH_BUCKET_ELEMS, shape.params) * b if stage == 3 else 0),
    }
    rows, length, kept = micro_batch_shape(learner, run)
    tokens = rows * length
    per_layer = ACT_HIDDEN_ELEMS * shape.hidden + ACT_MLP_ELEMS * shape.intermediate + 2 * shape.kv_dim
    if learner.gradient_checkpointing:
        parts["activations"] = tokens * (shape.layers * CKPT_HIDDEN_ELEMS * shape.hidden + per_layer) * b
    else:
        parts["activations"] = tokens * shape.layers * per_layer * b
    # logits [rows, kept, vocab]: the LM head's output in the training dtype, then fp32 copies (home_rl/learner/losses.py)
    parts["logits"] = rows * kept * shape.vocab * (4 * LOGIT_COPIES + (b if b < 4 else 0))
    if getattr(learner, "shared_prefix", False) and run.rollout is not None and run.rollout.n > 1:
        # Shared rows hold fewer tokens than separate ones (the prompt once), so the parts above bound them;
        # what they add is the 4D attention mask [rows, 1, T, T], boolean, and sdpa's copy in the training dtype.
        # (Rows of one sequence, as in SFT, run the plain causal pass: no mask.)
        shared_rows, shared_length = shared_row_shape(learner, run)
        parts["attention_mask"] = shared_rows * shared_length ** 2 * (1 + b)
    # loading (home_rl/learner/model_io.py): under ZeRO-3 a rank holds its partition and one layer at a time,
    # stages 0-2 the whole model once
    load = (shape.params / w + shape.largest_layer) * b if stage == 3 else shape.params * b
    return {k: v / GIB for k, v in parts.items()} | {"loading": load / GIB}


def micro_batch_shape(learner: LearnerConfig, run: Run) -> tuple[int, int, int]:
    """(rows, tokens per row, kept logit positions per row) of the largest micro-batch a learner runs.

    Every sequence as long as the config allows (data.max_prompt_tokens + the response limit); with a token
    budget (learner.max_tokens_per_micro_batch) as many such rows as the budget holds, at least one."""
    length = run.prompt_tokens + run.response_tokens
    if run.rollout is not None:
        length = min(length, run.rollout.max_model_len)
    budget = int(getattr(learner, "max_tokens_per_micro_batch", 0) or 0)
    rows = max(1, budget // length) if budget > 0 else learner.micro_batch_size
    return rows, length, min(run.response_tokens, length)


def shared_row_shape(learner: LearnerConfig, run: Run) -> tuple[int, int]:
    """(rows, tokens per row) of the largest shared-prefix micro-batch: rows of one prompt and as many of its
    rollout.n responses as a micro-batch (or the token budget) holds."""
    prompt = run.prompt_tokens
    n = run.rollout.n if run.rollout is not None else 1
    budget = int(getattr(learner, "max_tokens_per_micro_batch", 0) or 0)
    if budget > 0:
        per_row = max(1, min(n, (budget - prompt) // max(run.response_tokens, 1)))
        length = prompt + per_row * run.response_tokens
        return max(1, budget // length), length
    per_row = max(1, min(n, learner.micro_batch_size))
    return max(1, learner.micro_batch_size // per_row), prompt + per_row * run.response_tokens


def rollout_parts(shape: ModelShape, rollout: RolloutConfig, on_gpu: bool, gpu_gib: float,
                  bf16: bool = True) -> dict[str, float]:
    """GiB per part of one rollout engine: the view's weights, the KV cache, vLLM's activations on a GPU, and the
    vision encoder's buffers of a multimodal model."""
    # a CPU without bfloat16 runs a bfloat16 engine in float32 (home_rl/rollout/worker.py)
    b = 4 if rollout.dtype == "float32" or (rollout.dtype == "bfloat16" and not bf16 and not on_gpu) else 2
    tp = max(1, rollout.tensor_parallel_size)
    parts = {"weights": shape.view * b / tp / GIB}
    if on_gpu:  # vLLM takes its share of the GPU whole: weights, activations, and the rest as KV cache
        budget = rollout.gpu_memory_utilization * gpu_gib
        if rollout.kv_cache_gib > 0:
            budget = min(budget, parts["weights"] + VLLM_GPU_ACTIVATIONS_GIB + rollout.kv_cache_gib)
        parts["kv_cache"] = max(budget - parts["weights"] - VLLM_GPU_ACTIVATIONS_GIB, 0.0)
        parts["activations"] = VLLM_GPU_ACTIVATIONS_GIB
    else:
        parts["kv_cache"] = rollout.kv_cache_gib or 4.0  # vLLM CPU's own default (VLLM_CPU_KVCACHE_SPACE) when 0
    if shape.multimodal:  # the encoder cache (image embeddings waiting for the decoder) and one image's encoding
        cached = max(rollout.limit_images_per_prompt * IMAGE_TOKENS, ENCODER_CACHE_TOKENS) * shape.hidden * b
        encoding = IMAGE_TOKENS * 4 * 4 * shape.hidden * b  # 4 patches per merged token, ~4 hidden-sized transients
        parts["vision_buffers"] = (cached + encoding) / GIB
    return parts


def kv_bytes_per_token(shape: ModelShape, rollout: RolloutConfig) -> float:
    """KV-cache bytes of one token on one engine: keys and values of every layer, split over tensor parallel."""
    b = 4 if rollout.dtype == "float32" else 2
    return shape.layers * 2 * shape.kv_dim * b / max(1, rollout.tensor_parallel_size)
