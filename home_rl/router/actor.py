"""The Ray actor that holds a HOME model for the router stage and the evaluation.

It exports the experts' dense views (for the vLLM rollout workers) and their weights (for a view
swap), computes router features, fits the router on them and saves the checkpoint with the fitted
router. It holds the model in plain torch (no DeepSpeed: no gradient ever reaches the base model)
and writes the HOME checkpoint with only the router changed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from home_rl.console import actor_env, capture_output
from home_rl.model.architectures import decoder_layers
from home_rl.model.router import Router
from home_rl.resources import Resources, compute_dtype
from home_rl.router.config import RouterTrainConfig
from home_rl.router.features import candidate_features, compute_features
from home_rl.router.trainer import FitResult, fit_router


class HomeModelActor:
    """Ray actor around one HOME checkpoint: exports its views, computes router features, fits and saves the router.

        actor = ray.remote(HomeModelActor).remote(checkpoint, threads=1)
        feats = ray.get(actor.features.remote(items, batch_size=8))
        fit = ray.get(actor.fit.remote(feats, labels, cfg))
        ray.get(actor.install_router.remote(fit.state, note)); ray.get(actor.save.remote(out_dir))
    """

    def __init__(self, checkpoint: str, threads: int = 1, device: str = "cpu"):
        capture_output("home-model")  # first: transformers' output goes to the run's logs/
        from home_rl.model import HomeModel

        torch.set_num_threads(max(1, threads))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.checkpoint = str(checkpoint)
        self.device = torch.device(device)
        # Computed in float32 where the device only emulates bfloat16; saved back in the checkpoint's own dtype, so
        # every tensor but the router's is written bit for bit (float32 holds every bfloat16 value exactly).
        self.home = HomeModel.from_pretrained(self.checkpoint).eval()
        self.saved_dtype = self.home.base.dtype
        self.home.to(self.device, compute_dtype(self.saved_dtype, self.device.type))
        self.home.requires_grad_(False)
        self.sender = None  # a home_rl.weights.WeightSender, once a view swap needs one

    def info(self) -> dict:
        cfg = self.home.home_config
        return {"hidden_size": self.home.router.net[0].normalized_shape[0],
                "num_layers": len(decoder_layers(self.home.base, self.home.arch)),
                "router_hidden_size": cfg["router_hidden_size"], "router_layer": cfg["router_layer"],
                "router_pooling": cfg["router_pooling"], "multimodal": self.home.arch.multimodal,
                "dtype": str(self.saved_dtype).replace("torch.", ""), "router_trained": cfg.get("router_trained"),
                "operating_point": cfg.get("router_operating_point")}

    def export_view(self, expert: str, out_dir: str) -> str:
        """Write `expert`'s dense view (for the vLLM rollout workers) unless a complete one is there."""
        if not (Path(out_dir) / "config.json").is_file():
            self.home.export_view(expert, out_dir)
        return str(out_dir)

    def stage_expert(self, version: int, expert: str) -> None:
        """`expert`'s MLP tensors under the view's (dense model's) names, as weights `version` for the engines that
        serve a view (a view swap sends only what differs between the views; a LoRA expert's merged in)."""
        from home_rl.model import FAST, view_name
        from home_rl.weights import WeightSender

        self.sender = self.sender or WeightSender()
        mlp = [view_name(n, FAST) for n in self.home.checkpoint_keys() if f".experts.{FAST}." in n]
        view = self.home.view_state_dict(expert)
        self.sender.stage(version, [(n, view[n].detach().to("cpu", self.saved_dtype, copy=True)) for n in mlp])

    def connect_engines(self, engines: list, workers_per_engine: int, backend: str) -> None:
        from home_rl.weights import WeightSender

        self.sender = self.sender or WeightSender()
        self.sender.connect(engines, workers_per_engine, backend)

    def send_weights(self, version: int) -> dict:
        return self.sender.send(version)

    def features(self, items: list[dict], batch_size: int = 8,
                 candidates: Optional[list[tuple[int, str]]] = None) -> Any:
        """Router features at the router's own layer and pooling; with `candidates` ((layer, pooling) pairs), a
        dict of features per candidate (what the router stage chooses the router's input from)."""
        if candidates:
            return candidate_features(self.home, items, candidates, batch_size, device=self.device)
        return compute_features(self.home, items, batch_size, device=self.device)

    def fit(self, features: torch.Tensor, labels: list[int], cfg: RouterTrainConfig,
            net_gains: Optional[list[float]] = None, strata: Optional[list[str]] = None) -> FitResult:
        init = self.home.router.state_dict() if cfg.init == "checkpoint" else None
        return fit_router(features, labels, cfg, self.home.home_config["router_hidden_size"], init, net_gains, strata)

    def route_logits(self, features: torch.Tensor, state: Optional[dict] = None) -> torch.Tensor:
        """Router logits [N, 2] for [fast, think]: the model's own router, or a router with `state`."""
        router = self.home.router
        if state is not None:
            router = Router(features.shape[1], self.home.home_config["router_hidden_size"]).float()
            router.load_state_dict(state)
        with torch.no_grad():
            return router.to(self.device)(features.to(self.device)).float().cpu()

    def install_router(self, state: dict, note: dict, operating_point: Optional[dict] = None,
                       reads: Optional[tuple[int, str]] = None) -> None:
        """Put a fitted router into the model (in the model's dtype) and record how it was trained, the
        threshold it routes with (home_rl/router/operating_point.py; none: its argmax) and, when given, the
        (layer, pooling) its input is read at."""
        if reads is not None:
            self.home.home_config["router_layer"], self.home.home_config["router_pooling"] = int(reads[0]), reads[1]
        own = self.home.router.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].dtype))
        self.home.home_config["router_trained"] = note
        self.home.home_config.pop("router_operating_point", None)
        if operating_point is not None:
            self.home.home_config["router_operating_point"] = operating_point

    def save(self, out_dir: str) -> str:
        computed = self.home.base.dtype
        self.home.to(self.saved_dtype)
        try:
            return str(self.home.save_pretrained(out_dir))
        finally:
            self.home.to(computed)


def start_home_model_actor(checkpoint: str, resources: Resources) -> Any:
    """The HomeModelActor on the running Ray cluster (CUDA when it is given a GPU). On CPU it computes with every
    core of its node unless resources.threads says otherwise: it computes only while the engines are down (the
    router stage and the evaluation run one after the other), and 2 threads computed the embedded default's
    features in 0.53x the time of 1 (benchmarks/router_features.py)."""
    import ray

    threads = resources.num_threads(default=0 if resources.gpus else (os.cpu_count() or 1))
    actor = ray.remote(HomeModelActor).options(**resources.actor_options(),
                                               runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), **actor_env()}})
    return actor.remote(checkpoint, threads, "cuda" if resources.gpus > 0 else "cpu")
