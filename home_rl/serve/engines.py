"""vLLM engines with continuous batching (vLLM's AsyncLLM) over the expert views, and the views they serve.

A view is a plain dense checkpoint of the base architecture (the shared weights plus one expert), so
stock vLLM serves it with no custom code: one engine per view. A HOME model whose think expert is a
LoRA over fast can be served by one engine (engine.lora_engine=adapter, the default on GPUs): the fast
view, and think's adapter on the requests routed to think (vLLM batches requests with and without it
together), so neither expert waits behind an engine of its own. The views are exported from the HOME
checkpoint once, into output_dir/views/, and exported again only when the checkpoint changes.

    views = export_views(checkpoint, out / "views")          # ServedViews: a folder per expert (+ think's adapter)
    engines = start_engines(views, cfg.engine)                # {"think": engine, "fast": engine}
    async for delta in engines["think"].generate(job): ...    # GenerationDelta: new text per sample
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from home_rl.experts import EXPERTS, FAST, THINK
from home_rl.serve.config import EngineConfig
from home_rl.serve.protocol import Sampling

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerationJob:
    """What an engine is asked: one prompt, n samples."""
    request_id: str
    prompt: dict  # vLLM input: {"prompt_token_ids": [...]} (+ "multi_modal_data": {"image": [PIL images]})
    sampling: Sampling
    max_tokens: int  # resolved against the context


@dataclasses.dataclass
class SampleDelta:
    index: int  # which of the n samples
    text: str  # text generated since the last delta
    tokens: int  # tokens generated since the last delta
    finish_reason: Optional[str] = None  # stop | length, on the sample's last delta


@dataclasses.dataclass
class GenerationDelta:
    prompt_tokens: int
    samples: list[SampleDelta]


HYBRID = "hybrid"  # the name of an engine that serves both experts


@dataclasses.dataclass
class ServedViews:
    folders: dict[str, Path]  # the dense view each expert's engine loads (with `adapter`: the fast view for both)
    adapter: Optional[Path] = None  # think's LoRA adapter over the fast view: one engine serves both experts


def export_views(checkpoint: str | Path, out_dir: str | Path, home: Any = None, adapter: bool = True) -> ServedViews:
    """Both experts' views of `checkpoint` under out_dir/<expert>/ (a LoRA think expert with `adapter`: the fast view
    and think's adapter), unless the ones there came from this very checkpoint (same files, sizes and times, and the
    same `adapter`). `home`: the HomeModel already loaded from it."""
    from home_rl.model.lora_expert import ADAPTER_DIR, has_lora_think

    out_dir = Path(out_dir)
    lora = adapter and has_lora_think(checkpoint)
    stamp = {**_checkpoint_stamp(Path(checkpoint)), "adapter": lora}
    stamp_file = out_dir / "source.json"
    exported = [FAST] if lora else list(EXPERTS)
    views = ServedViews({expert: out_dir / (FAST if lora else expert) for expert in EXPERTS},
                        out_dir / ADAPTER_DIR if lora else None)
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and \
            all((out_dir / e / "config.json").is_file() for e in exported):
        return views
    from home_rl.model import HomeModel

    home = home if home is not None else HomeModel.from_pretrained(checkpoint)
    shutil.rmtree(out_dir, ignore_errors=True)
    for expert in exported:
        home.export_view(expert, out_dir / expert)
    if lora:
        home.export_adapter(views.adapter)
    stamp_file.write_text(json.dumps(stamp))
    return views


def start_engines(views: ServedViews, cfg: EngineConfig) -> dict[str, Any]:
    """The engine each expert's requests go to: one per view, or one for both (`views.adapter`)."""
    engines: dict[str, Any] = {}
    try:
        if views.adapter is not None:
            both = ViewEngine(views.folders[FAST], HYBRID, cfg, adapter=views.adapter)
            return {expert: ExpertLane(both, expert) for expert in EXPERTS}
        for expert in EXPERTS:
            engines[expert] = ViewEngine(views.folders[expert], expert, cfg)
        return engines
    except BaseException:
        for engine in engines.values():
            engine.shutdown()
        raise


def _checkpoint_stamp(folder: Path) -> dict:
    """The checkpoint's files (its think adapter's folder included) by size and time."""
    return {"checkpoint": str(folder.resolve()),
            "files": {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
                      for p in sorted(folder.rglob("*")) if p.is_file()}}


def engine_cores(setting: str, expert: str) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `expert`'s engine. vLLM's `auto` binds every engine of a machine to the same
    cores (on 2 cores: both to core 0, core 1 left to other processes), so the two views would decode on one
    core while the other idles; `split` gives each its own half (README, Serving: what that changed)."""
    if setting != "split":
        return setting
    cores = sorted(os.sched_getaffinity(0))
    if expert == HYBRID:  # the only engine
        return ",".join(map(str, cores))
    half = len(cores) // 2
    mine = cores if half == 0 else (cores[half:] if expert == THINK else cores[:half])
    return ",".join(map(str, mine))


class ViewEngine:
    """vLLM's AsyncLLM over one view: requests from many clients are batched continuously by the engine. With
    `adapter` (think's LoRA over the fast view `view_dir`) it answers think's requests with the adapter."""

    def __init__(self, view_dir: str | Path, expert: str, cfg: EngineConfig, adapter: Optional[Path] = None):
        import transformers
        from vllm import AsyncEngineArgs

        from home_rl import vllm_names as vn
        from home_rl.rollout.adapter import engine_args, think_request
        from home_rl.rollout.worker import engine_dtype, placeholder_bias

        self.expert, self.cfg = expert, cfg
        self.cores = engine_cores(cfg.cpu_threads_bind, expert)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.cores  # read by the engine process it starts
        hf_config = transformers.AutoConfig.from_pretrained(view_dir)
        multimodal = hasattr(hf_config, "vision_config")
        self.can_seed = not vn.is_cpu()  # the CPU build crashes on a per-request seed
        args = AsyncEngineArgs(
            model=str(view_dir), served_model_name=expert, dtype=engine_dtype(cfg.dtype, f"the {expert} engine"),
            seed=cfg.seed, max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching, max_num_seqs=cfg.max_num_seqs,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30) if cfg.kv_cache_gib > 0 else None,
            gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size,
            limit_mm_per_prompt={"image": cfg.limit_images_per_prompt} if multimodal else None,
            disable_log_stats=True,
            **(engine_args(adapter) if adapter else {}))
        self.lora = {THINK: think_request(adapter)} if adapter else {}
        self.engine = vn.AsyncLLM.from_engine_args(args)
        self.bias = placeholder_bias(hf_config) if multimodal else {}

    def sampling_params(self, job: GenerationJob) -> Any:
        from vllm import SamplingParams

        from home_rl.vllm_names import RequestOutputKind

        s = job.sampling
        return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=job.max_tokens,
                              stop=list(dict.fromkeys([*self.cfg.stop, *s.stop])), include_stop_str_in_output=True,
                              presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                              seed=s.seed if self.can_seed else None, logit_bias=self.bias or None,
                              output_kind=RequestOutputKind.DELTA)

    async def generate(self, job: GenerationJob, expert: Optional[str] = None) -> AsyncIterator[GenerationDelta]:
        """Deltas as the engine steps; closing the iterator (a client gone) aborts the request in the engine.
        `expert`: whose answer, where the engine serves both (think's adapter on, or off)."""
        async for out in self.engine.generate(job.prompt, self.sampling_params(job), job.request_id,
                                              lora_request=self.lora.get(expert)):
            samples = [SampleDelta(c.index, c.text, len(c.token_ids), c.finish_reason) for c in out.outputs]
            yield GenerationDelta(len(out.prompt_token_ids or ()), samples)

    def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()


class ExpertLane:
    """One expert's way into an engine that serves both: what the server holds as that expert's engine."""

    def __init__(self, engine: ViewEngine, expert: str):
        self.engine, self.expert = engine, expert

    async def generate(self, job: GenerationJob) -> AsyncIterator[GenerationDelta]:
        async for delta in self.engine.generate(job, self.expert):
            yield delta

    def shutdown(self) -> None:
        self.engine.shutdown()  # the engine's own shutdown runs once
