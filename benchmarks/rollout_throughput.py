"""Rollout throughput: one vLLM worker vs transformers `generate`, 1 vs 2 workers, weight-update times.

    python benchmarks/rollout_throughput.py            # prints one JSON object

Model: the embedded SmolLM2-135M-Instruct (home_rl.model.embedded), bf16. Workload as in training:
16 prompts x n=8 samples, sampled at temperature 1 (no top-k/top-p), up to 128 new tokens, stopping
at the end of the answer (`</answer>`) or the end of the turn. The prompts carry two worked example
exchanges, so the model writes `<answer>...</answer>` and stops early, as during GRPO.

Tokens/s count generated tokens (up to and including the stop) over the wall time of the call.
transformers generates all 128 samples as one batch (num_return_sequences=8) with the same
stopping rules; finished rows idle until the last one ends, which is part of what is measured.
The machine may be shared: the 1-minute load average around each timed section is reported, and
tokens per CPU-second of the generating process (`*_tokens_per_cpu_s`) as a figure that depends
less on what else runs (it still counts the threads' spinning when cores are oversubscribed).

Also reported: a think-expert-only update (every decoder MLP: what GRPO changes, under the view's
names) against a full-model update, and the log-prob agreement of the bf16 engine with
transformers (bf16 and fp32 forwards) on the same tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

SYSTEM = ("You are a helpful assistant. Think step by step inside <think></think>, "
          "then give the final answer inside <answer></answer>.")
EXAMPLES = [("What is 7 + 5?", "<think>7 + 5 = 12.</think><answer>12</answer>"),
            ("What is 6 * 4?", "<think>6 * 4 = 24.</think><answer>24</answer>")]


def questions(count: int) -> list[str]:
    out = []
    for i in range(count):
        a, b = 11 + 7 * i % 80, 3 + 5 * i % 60
        out.append(f"What is {a} + {b}?" if i % 2 == 0 else f"What is {2 + i % 8} * {3 + i % 7}?")
    return out


def render(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in EXAMPLES:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def generated_length(tokenizer, ids: list[int], eos_id: int, stop: str) -> int:
    """Tokens up to and including the EOS token or the token that completes the stop string."""
    for k, tok in enumerate(ids):
        if tok == eos_id or stop in tokenizer.decode(ids[:k + 1]):
            return k + 1
    return len(ids)


def hf_generate(model, tokenizer, prompts: list[list[int]], n: int, max_new: int, stop: str) -> dict:
    import torch

    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding for generation
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             num_return_sequences=n, max_new_tokens=max_new, stop_strings=[stop], tokenizer=tokenizer,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    lengths = [generated_length(tokenizer, row[width:].tolist(), tokenizer.eos_token_id, stop) for row in out]
    return {"seconds": seconds, "generated_tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
            "tokens_per_cpu_s": sum(lengths) / cpu_seconds, "mean_response_tokens": sum(lengths) / len(lengths)}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def progress(report: dict) -> None:
    """The figures so far, on stderr: a run cut short still leaves what it measured."""
    print(json.dumps(report), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--skip-two-workers", action="store_true", help="leave out the 2-worker run")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch
    import transformers

    from home_rl.model.embedded import resolve_model_path
    from home_rl.resources import Resources
    from home_rl.rollout import RolloutConfig, RolloutPool, logprob_agreement, recompute_logprobs

    path = str(resolve_model_path("smollm2"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompt_ids = [render(tokenizer, q) for q in questions(args.prompts)]
    prompts = [{"prompt_token_ids": ids, "row_id": f"b{i}"} for i, ids in enumerate(prompt_ids)]
    stop = "</answer>"
    cores = os.cpu_count() or 1
    cfg = RolloutConfig(num_workers=1, n=args.n, temperature=1.0, max_response_tokens=args.max_new_tokens,
                        stop=[stop], max_model_len=1024, dtype="bfloat16", kv_cache_gib=2, resources=Resources(threads=cores),
                        seed=0)
    ray.init(address="local", num_cpus=max(4, cores), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    report: dict = {"model": "SmolLM2-135M-Instruct", "dtype": "bfloat16", "prompts": args.prompts, "n": args.n,
                    "max_new_tokens": args.max_new_tokens, "cores": cores, "vllm_enforce_eager": cfg.enforce_eager}

    # ---- one vLLM worker
    start = time.perf_counter()
    pool = RolloutPool(path, cfg)
    report["vllm_start_s"] = time.perf_counter() - start
    pool.generate(prompts[:2], n=2, seed=123)  # warm-up: first call compiles the sampler's kernels
    load_before = load()
    result = pool.generate(prompts, seed=0)
    samples = result.flat()
    report.update({"vllm_tokens_per_s": result.stats["tokens_per_s"], "vllm_seconds": result.stats["seconds"],
                   "vllm_tokens_per_cpu_s": result.stats["generated_tokens"] / result.stats["cpu_seconds"],
                   "vllm_load_avg": [load_before, load()],
                   "vllm_generated_tokens": result.stats["generated_tokens"],
                   "vllm_mean_response_tokens": result.stats["generated_tokens"] / len(samples),
                   "vllm_stopped_at_answer": sum(stop in s.text for s in samples) / len(samples)})

    progress(report)

    # ---- weight updates: the think expert's tensors (every decoder MLP, view names) vs the whole model
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    state = dense.state_dict()
    think = [(k, v) for k, v in state.items() if ".mlp." in k]
    from home_rl.weights import WeightSender

    pool.attach(WeightSender())  # this process sends, as learner rank 0 does in a run
    pool.sender.stage(1, think)
    think_report = pool.sync(1)
    pool.sender.stage(2, state.items())
    full_report = pool.sync(2)
    report.update({"think_update_s": think_report["seconds"], "think_update_mb": think_report["bytes"] / 2**20,
                   "think_update_buckets": think_report["buckets"],
                   "full_update_s": full_report["seconds"], "full_update_mb": full_report["bytes"] / 2**20,
                   "full_update_buckets": full_report["buckets"]})

    progress(report)

    # ---- log-prob agreement of the bf16 engine with transformers on the same tokens
    subset = samples[: 4 * args.n]
    bf16 = logprob_agreement(subset, recompute_logprobs(dense, subset, pad_token_id=tokenizer.pad_token_id))
    fp32_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fp32 = logprob_agreement(subset, recompute_logprobs(fp32_model, subset, pad_token_id=tokenizer.pad_token_id))
    del fp32_model
    for name, stats in (("hf_bf16", bf16), ("hf_fp32", fp32)):
        report.update({f"logprob_bf16_vs_{name}_max_abs": stats["rollout/logprob_diff_max"],
                       f"logprob_bf16_vs_{name}_mean_abs": stats["rollout/logprob_diff_mean"],
                       f"logprob_bf16_vs_{name}_pearson": stats["rollout/logprob_pearson"]})
    report["logprob_tokens"] = bf16["tokens"]
    pool.shutdown()

    progress(report)

    # ---- transformers generate, same prompts and stopping rules, bf16, all cores
    torch.set_num_threads(cores)
    hf_generate(dense, tokenizer, prompt_ids[:2], 2, 8, stop)  # warm-up
    load_before = load()
    hf = hf_generate(dense, tokenizer, prompt_ids, args.n, args.max_new_tokens, stop)
    report.update({"hf_tokens_per_s": hf["tokens_per_s"], "hf_seconds": hf["seconds"],
                   "hf_tokens_per_cpu_s": hf["tokens_per_cpu_s"], "hf_load_avg": [load_before, load()],
                   "hf_generated_tokens": hf["generated_tokens"], "hf_mean_response_tokens": hf["mean_response_tokens"]})
    report["vllm_vs_hf_ratio"] = report["vllm_tokens_per_s"] / report["hf_tokens_per_s"]
    report["vllm_vs_hf_cpu_ratio"] = report["vllm_tokens_per_cpu_s"] / report["hf_tokens_per_cpu_s"]
    del dense

    progress(report)

    # ---- two workers sharing the machine's cores
    report["one_worker_tokens_per_s"] = report["vllm_tokens_per_s"]
    if not args.skip_two_workers and cores >= 2:
        two = RolloutPool(path, dataclasses.replace(cfg, num_workers=2, resources=Resources(threads=max(1, cores // 2)), kv_cache_gib=1))
        two.generate(prompts[:4], n=2, seed=123)  # warm-up on both workers
        load_before = load()
        result2 = two.generate(prompts, seed=0)
        report.update({"two_workers_tokens_per_s": result2.stats["tokens_per_s"],
                       "two_workers_load_avg": [load_before, load()],
                       "two_workers_per_worker_tokens_per_s": [w["tokens_per_s"] for w in result2.stats["per_worker"]],
                       "two_workers_prompts_per_worker": [w["prompts"] for w in result2.stats["per_worker"]],
                       "two_vs_one_worker_ratio": result2.stats["tokens_per_s"] / report["vllm_tokens_per_s"]})
        two.shutdown()
    ray.shutdown()
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    sys.exit(main())
