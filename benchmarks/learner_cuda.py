"""Check the learner group's CUDA path on one GPU and time it; prints one JSON object.

    python benchmarks/learner_cuda.py [--mode auto|ray|direct] [--out result.json] [--no-big]

1. A tiny Qwen2 is upcycled to HOME and trained (trainable=think) for 3 steps in float32 and in
   bfloat16 by a LearnerGroup on local Ray with learner.device=cuda (--mode direct: one
   LearnerWorker in this process, world size 1, no Ray). Checked: the backend in use (nccl), that
   exactly the `.experts.think.` tensors changed, that the sync path (view=think, only_trainable)
   names the think expert under dense names, and that the gathered think view loaded into the
   exported think view reproduces the learner's logits. Reported: step times, GPU memory peak.
2. Timing: the same on a HOME upcycled from a larger random Qwen2 (hidden 1024, 8 layers), bf16,
   micro-batch 16 sequences of 256 tokens: tokens/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from home_rl.learner import LearnerConfig, Sequence  # noqa: E402
from home_rl.resources import Resources  # noqa: E402


# ----------------------------------------------------------------------------- groups

class RayGroup:
    """The real LearnerGroup, plus calls into the actor (memory, backend) through __ray_call__."""

    def __init__(self, cfg: LearnerConfig, model_dir: str, dtype: str, total_steps: int):
        from home_rl.learner import LearnerGroup

        self.group = LearnerGroup(cfg, model_dir, dtype=dtype, total_steps=total_steps)
        self.info = self.group.info[0]

    def call(self, fn):
        import ray

        return ray.get(self.group.actors[0].__ray_call__.remote(fn))

    def __getattr__(self, name):
        return getattr(self.group, name)


class DirectGroup:
    """World size 1 without Ray: one LearnerWorker in this process, called as LearnerGroup calls it."""

    def __init__(self, cfg: LearnerConfig, model_dir: str, dtype: str, total_steps: int):
        from home_rl.config import to_dict
        from home_rl.learner.worker import LearnerWorker

        self.cfg = cfg
        self.worker = LearnerWorker(0, 1, to_dict(cfg), cfg.resources.num_threads())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.info = self.worker.setup("127.0.0.1", port, str(model_dir), dtype, total_steps)

    def call(self, fn):
        return fn(self.worker)

    def _plan(self, batch):
        from home_rl.learner.plan import plan_micro_batches

        plan = plan_micro_batches(batch, self.cfg.micro_batch_size)
        return plan, len(plan)

    def train_step(self, batch):
        start = time.perf_counter()
        totals = {"tokens": sum(s.num_loss_tokens for s in batch), "sequences": len(batch), "labelled": 0}
        m = self.worker.train_step(batch, *self._plan(batch), totals, "sft")
        elapsed = time.perf_counter() - start
        tokens = sum(len(s) for s in batch)
        return {**m, "step_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed}

    def logits(self, batch):
        return self.worker.logits(batch, *self._plan(batch))

    def iter_weights(self, view=None, only_trainable=False):
        for names in self.worker.weight_chunks(view, only_trainable):
            yield from self.worker.gather(names, view)

    def weight_chunks(self, view, only_trainable):
        return self.worker.weight_chunks(view, only_trainable)

    def shutdown(self):
        self.worker.engine.destroy() if hasattr(self.worker.engine, "destroy") else None
        self.worker = None
        gc.collect()
        torch.cuda.empty_cache()


def make_group(mode, cfg, model_dir, dtype, total_steps):
    return (RayGroup if mode == "ray" else DirectGroup)(cfg, str(model_dir), dtype, total_steps)


def chunks_of(group, view, only_trainable):
    if isinstance(group, RayGroup):
        import ray

        return ray.get(group.group.actors[0].weight_chunks.remote(view, only_trainable))
    return group.weight_chunks(view, only_trainable)


# ----------------------------------------------------------------------------- data and models

def long_batch(n: int, prompt: int, response: int, vocab: int, seed: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    return [Sequence(prompt_ids=torch.randint(vocab, (prompt,), generator=g).tolist(),
                     response_ids=torch.randint(vocab, (response,), generator=g).tolist(), route="think")
            for _ in range(n)]


def mixed_routes(batch: list[Sequence]) -> list[Sequence]:
    """Alternate think / fast routes: both experts run in one micro-batch, only think trains."""
    return [dataclasses.replace(seq, route=("think", "fast")[i % 2]) for i, seq in enumerate(batch)]


def build_big_dense(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    from home_rl.tiny import SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def to_home(dense_dir: Path, out: Path) -> Path:
    from home_rl.model import upcycle

    return Path(upcycle(dense_dir).save_pretrained(out))


def peak_mem_gib(group) -> float:
    return round(group.call(lambda self: torch.cuda.max_memory_allocated()) / 2 ** 30, 3)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- checks

def small_run(mode: str, home_dir: Path, dtype: str, work: Path) -> dict:
    from home_rl.model import HomeModel

    out: dict = {"dtype": dtype}
    batch = mixed_routes(long_batch(10, prompt=9, response=6, vocab=600, seed=3))
    cfg = LearnerConfig(num_learners=1, trainable="think", lr=1e-2, micro_batch_size=3, device="cuda",
                        resources=Resources(cpus=2))
    t0 = time.perf_counter()
    group = make_group(mode, cfg, home_dir, dtype, total_steps=3)
    out["setup_s"] = round(time.perf_counter() - t0, 2)
    try:
        out["info"] = group.info
        out["backend"] = group.call(lambda self: torch.distributed.get_backend())
        out["param_device"] = group.call(lambda self: str(next(self.module.parameters()).device))
        before = dict(group.iter_weights())
        steps = [group.train_step(batch) for _ in range(3)]
        out["step_s"] = [round(m["step_s"], 4) for m in steps]
        out["compute_s"] = [round(m["compute_s"], 4) for m in steps]
        out["loss"] = [round(m["loss"], 5) for m in steps]
        out["grad_norm"] = [round(m["grad_norm"], 5) for m in steps]
        after = dict(group.iter_weights())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        think = {n for n in before if ".experts.think." in n}
        out["changed_tensors"] = len(changed)
        out["think_tensors"] = len(think)
        out["only_think_changed"] = bool(changed == think and think)
        if changed != think:
            out["changed_not_think"] = sorted(changed - think)[:10]
            out["think_not_changed"] = sorted(think - changed)[:10]

        chunks = chunks_of(group, "think", True)
        synced = dict(group.iter_weights(view="think", only_trainable=True))
        want = sorted(n.replace("base.", "", 1).replace(".experts.think", "") for n in think)
        out["sync_chunks"] = len(chunks)
        out["sync_names_ok"] = sorted(synced) == want
        out["sync_dtype"] = str(next(iter(synced.values())).dtype).replace("torch.", "")

        # The gathered think view, loaded into the exported think view (fresh HOME -> export_view),
        # reproduces the learner's logits.
        view_dir = HomeModel.from_pretrained(home_dir, dtype=torch.float32).export_view("think", work / f"view_{dtype}")
        view = dict(group.iter_weights(view="think"))
        tdtype = getattr(torch, dtype)
        dense = transformers.AutoModelForCausalLM.from_pretrained(view_dir, dtype=tdtype).to("cuda").eval()
        missing, unexpected = dense.load_state_dict(view, strict=False)
        out["view_load_ok"] = not unexpected and set(missing) <= {"lm_head.weight"}
        think_batch = [Sequence(s.prompt_ids, s.response_ids, route="think") for s in batch]
        learner_logits = group.logits(think_batch)
        diffs, scale = [], 0.0
        with torch.no_grad():
            for seq, got in zip(think_batch, learner_logits):
                ids = torch.tensor([seq.prompt_ids + seq.response_ids], device="cuda")
                P, R = len(seq.prompt_ids), len(seq.response_ids)
                ref = dense(input_ids=ids).logits[0, P - 1:P + R - 1].float().cpu()
                diffs.append((got - ref).abs().max().item())
                scale = max(scale, ref.abs().max().item())
        out["max_logit_diff"] = max(diffs)
        out["max_abs_logit"] = round(scale, 4)
        del dense
        out["gpu_peak_gib"] = peak_mem_gib(group)
    finally:
        group.shutdown()
    return out


def big_run(mode: str, home_dir: Path, vocab: int, n_seq: int, prompt: int, response: int, steps: int,
            micro: int) -> dict:
    out: dict = {"dtype": "bfloat16", "sequences_per_step": n_seq, "tokens_per_seq": prompt + response,
                 "micro_batch_size": micro}
    batch = long_batch(n_seq, prompt, response, vocab, seed=1)
    cfg = LearnerConfig(num_learners=1, trainable="think", lr=1e-5, micro_batch_size=micro, device="cuda",
                        resources=Resources(cpus=4))
    t0 = time.perf_counter()
    group = make_group(mode, cfg, home_dir, "bfloat16", total_steps=steps + 1)
    out["setup_s"] = round(time.perf_counter() - t0, 2)
    try:
        out["info"] = group.info
        out["backend"] = group.call(lambda self: torch.distributed.get_backend())
        warm = group.train_step(batch)
        out["warmup_step_s"] = round(warm["step_s"], 3)
        group.call(lambda self: torch.cuda.reset_peak_memory_stats())
        ms = [group.train_step(batch) for _ in range(steps)]
        out["step_s"] = [round(m["step_s"], 4) for m in ms]
        out["compute_s"] = [round(m["compute_s"], 4) for m in ms]
        out["loss"] = [round(m["loss"], 4) for m in ms]
        tokens = ms[0]["tokens"]
        out["tokens_per_step"] = tokens
        out["tokens_per_s"] = round(tokens / statistics.median(m["step_s"] for m in ms), 1)
        out["tokens_per_s_compute"] = round(tokens / statistics.median(m["compute_s"] for m in ms), 1)
        out["gpu_peak_gib"] = peak_mem_gib(group)
        t0 = time.perf_counter()
        n = sum(t.numel() for _, t in group.iter_weights(view="think", only_trainable=True))
        out["sync_gather_s"] = round(time.perf_counter() - t0, 3)
        out["sync_params"] = n
    finally:
        group.shutdown()
    return out


def plain_torch_run(home_dir: Path, batch: list[Sequence], micro: int, steps: int) -> dict:
    """The compute floor: the same think-only step in plain torch (bf16 weights, no DeepSpeed)."""
    from home_rl.learner.batch import collate
    from home_rl.learner.plan import plan_micro_batches
    from home_rl.learner.losses import resolve_loss, LossInputs, token_log_probs
    from home_rl.model import HomeModel

    model = HomeModel.from_pretrained(home_dir, dtype=torch.bfloat16).to("cuda").train()
    params = [p for n, p in model.named_parameters() if ".experts.think." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(".experts.think." in n)
    opt = torch.optim.AdamW(params, lr=1e-5)
    spec = resolve_loss("sft")
    total = sum(s.num_loss_tokens for s in batch)
    times = []
    for step in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        for rows in plan_micro_batches(batch, micro):
            seqs = [batch[i] for row in rows for i in row]
            mb = collate(seqs, pad_id=0).to(torch.device("cuda"))
            inputs = mb.model_inputs()
            inputs["route"] = mb.routes if mb.routes is not None else "think"
            lp, ent = token_log_probs(model(**inputs).logits, mb.targets)
            share, _ = spec.fn(LossInputs(log_probs=lp, entropy=ent, loss_mask=mb.loss_mask, token_data=mb.token_data,
                                          seq_data=mb.seq_data, global_tokens=total, global_sequences=len(batch),
                                          world_size=1))
            share.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step:
            times.append(time.perf_counter() - t0)
    tokens = sum(len(s) for s in batch)
    out = {"step_s": [round(t, 4) for t in times], "tokens_per_s": round(tokens / statistics.median(times), 1),
           "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)}
    del model, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return out


def ds_variant(home_dir: Path, batch: list[Sequence], micro: int, steps: int, zero: dict, stage: int = 3,
               profile: bool = False) -> dict:
    """The learner (direct, world size 1) with its DeepSpeed config's zero section patched."""
    import home_rl.learner.worker as worker_mod

    original = worker_mod.deepspeed_config

    def patched(cfg, dtype, world_size):
        conf = original(cfg, dtype, world_size)
        conf["zero_optimization"].update(zero)
        return conf

    worker_mod.deepspeed_config = patched
    try:
        cfg = LearnerConfig(num_learners=1, trainable="think", lr=1e-5, micro_batch_size=micro, device="cuda",
                            resources=Resources(cpus=4), zero_stage=stage)
        group = DirectGroup(cfg, str(home_dir), "bfloat16", steps + 2)
        try:
            group.train_step(batch)
            torch.cuda.reset_peak_memory_stats()
            ms = [group.train_step(batch) for _ in range(steps)]
            out = {"zero": {"stage": stage, **zero}, "step_s": [round(m["step_s"], 4) for m in ms]}
            out["tokens_per_s"] = round(ms[0]["tokens"] / statistics.median(m["step_s"] for m in ms), 1)
            out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
            if profile:
                from torch.profiler import ProfilerActivity, profile as prof

                with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    group.train_step(batch)
                print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
                print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
        finally:
            group.shutdown()
    finally:
        worker_mod.deepspeed_config = original
    return out


def variants(work: Path, args) -> dict:
    big_dense = build_big_dense(work / "big_dense", args.big_hidden, args.big_layers, args.big_vocab)
    big_home = to_home(big_dense, work / "big_home")
    batch = long_batch(args.big_seqs, 64, 192, args.big_vocab, seed=1)
    out: dict = {"plain_torch_bf16": plain_torch_run(big_home, batch, 16, args.big_steps)}
    runs = {
        "ds_as_configured": ({}, 3, args.profile),
        "ds_persist_1e5_overlap": ({"stage3_param_persistence_threshold": int(1e5), "overlap_comm": True}, 3, False),
        "ds_persist_1e7": ({"stage3_param_persistence_threshold": int(1e7)}, 3, False),
        "ds_stage1": ({}, 1, False),
    }
    for name, (zero, stage, profile) in runs.items():
        try:
            if stage != 3:
                zero = {}
            out[name] = ds_variant(big_home, batch, 16, args.big_steps, zero, stage, profile)
        except Exception:  # noqa: BLE001
            out[name] = {"error": traceback.format_exc()[-2000:]}
            traceback.print_exc()
    return out


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["auto", "ray", "direct"], default="auto")
    ap.add_argument("--out", default="")
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--big-hidden", type=int, default=1024)
    ap.add_argument("--big-layers", type=int, default=8)
    ap.add_argument("--big-vocab", type=int, default=32000)
    ap.add_argument("--big-seqs", type=int, default=64)
    ap.add_argument("--big-steps", type=int, default=3)
    ap.add_argument("--variants", action="store_true",
                    help="instead of the checks: the big timing in plain torch and under DeepSpeed config variants "
                         "(direct mode)")
    ap.add_argument("--profile", action="store_true", help="with --variants: a torch.profiler table of one step")
    args = ap.parse_args()

    mode = args.mode
    if args.variants:
        mode = "direct"
    if mode == "auto":
        try:
            import ray  # noqa: F401

            mode = "ray"
        except ImportError:
            mode = "direct"
    result: dict = {"mode": mode, "errors": {}}
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as e:  # noqa: BLE001
        ds_version = f"import failed: {e}"
    result["env"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "deepspeed": ds_version, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0]}
    if mode == "ray":
        import ray

        result["env"]["ray"] = ray.__version__
        ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)

    from home_rl.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.variants:
        result["variants"] = variants(work, args)
        print("GPU_CHECK_JSON " + json.dumps(result, default=str), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        return 0
    home_dir = to_home(build_tiny_model("qwen2", work / "dense"), work / "home")
    result["small"] = {}
    for dtype in ("float32", "bfloat16"):
        try:
            result["small"][dtype] = small_run(mode, home_dir, dtype, work)
        except Exception:  # noqa: BLE001
            result["errors"][f"small_{dtype}"] = traceback.format_exc()[-3000:]
            traceback.print_exc()
    if not args.no_big:
        try:
            t0 = time.perf_counter()
            big_dense = build_big_dense(work / "big_dense", args.big_hidden, args.big_layers, args.big_vocab)
            big_home = to_home(big_dense, work / "big_home")
            from home_rl.model import HomeModel

            n = sum(p.numel() for p in HomeModel.from_pretrained(big_home).parameters())
            result["big_model"] = {"hidden": args.big_hidden, "layers": args.big_layers, "vocab": args.big_vocab,
                                   "home_params_m": round(n / 1e6, 1), "build_s": round(time.perf_counter() - t0, 1)}
            result["big"] = big_run(mode, big_home, args.big_vocab, args.big_seqs, 64, 192, args.big_steps, 16)
        except Exception:  # noqa: BLE001
            result["errors"]["big"] = traceback.format_exc()[-3000:]
            traceback.print_exc()
    text = json.dumps(result, default=str)
    print("GPU_CHECK_JSON " + text, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
