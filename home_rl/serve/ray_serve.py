"""Ray Serve, the scale-out path: a deployment per view behind one ingress that routes.

    ingress (router + HTTP API: the same HybridServer as the local backend)
      ├── think-view: replicas, each one ViewEngine (one vLLM engine), scaled by queue length
      └── fast-view:  replicas, each one ViewEngine

A HOME model whose think expert is a LoRA over fast has one view deployment (`hybrid-view`): each replica is
one engine over the fast view that answers think's requests with the adapter.

Above `ray.min_replicas`, Ray Serve's autoscaler adds a view's replicas while its requests in flight
and waiting exceed `ray.target_ongoing_requests` per replica, and removes them when the queue drains;
a replica takes at most `ray.max_ongoing_requests` at once. The ingress streams each request's
deltas from a replica through a streaming handle, so the think view's long answers and the fast
view's short ones scale apart.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from home_rl.experts import EXPERTS, FAST, THINK
from home_rl.serve.config import EngineConfig, ServeConfig
from home_rl.serve.engines import HYBRID, GenerationDelta, GenerationJob, ServedViews

log = logging.getLogger(__name__)


class ViewReplica:
    """One replica of a view's deployment: a vLLM engine over the view (`adapter`: and think's adapter over it)."""

    def __init__(self, view_dir: str, expert: str, engine: EngineConfig, adapter: Optional[str] = None):
        from home_rl.console import capture_output
        from home_rl.serve.engines import ViewEngine

        capture_output(f"serve-{expert}")
        self.engine = ViewEngine(view_dir, expert, engine, adapter=Path(adapter) if adapter else None)

    async def generate(self, job: GenerationJob, expert: Optional[str] = None) -> AsyncIterator[GenerationDelta]:
        async for delta in self.engine.generate(job, expert):
            yield delta

    def __del__(self):  # Ray Serve ends a replica (scale-down, shutdown) through its destructor
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class HandleClient:
    """A view's deployment handle, as the HybridServer's engine for `expert`: deltas stream from whichever replica
    takes it (a hybrid replica answers as `expert`)."""

    def __init__(self, handle: Any, expert: str):
        self.handle, self.expert = handle.options(stream=True), expert

    async def generate(self, job: GenerationJob) -> AsyncIterator[GenerationDelta]:
        async for delta in self.handle.generate.remote(job, self.expert):
            yield delta


class HybridIngress:
    """The ingress replica: loads the router and the processor, and serves the HybridServer's app."""

    def __init__(self, cfg: ServeConfig, checkpoint: str, think: Any, fast: Any):
        from home_rl.console import capture_output
        from home_rl.serve.app import HybridServer
        from home_rl.serve.metrics import ServeMetrics
        from home_rl.serve.router import PromptRouter
        from home_rl.trainer.startup import load_processor

        capture_output("serve-ingress")
        router = PromptRouter.load(checkpoint, cfg.router.batch_size, cfg.router.device)
        metrics = ServeMetrics(Path(cfg.output_dir) / "requests.jsonl", cfg.log_every_s)
        engines = {FAST: HandleClient(fast, FAST), THINK: HandleClient(think, THINK)}
        self.server = HybridServer(cfg, load_processor(checkpoint), router, engines, metrics)

    def __serve_build_asgi_app__(self) -> Any:
        from home_rl.serve.app import build_app

        return build_app(self.server)


def build_application(cfg: ServeConfig, checkpoint: str, views: ServedViews, env: dict[str, str]) -> Any:
    """The bound Ray Serve application: both view deployments (or the one hybrid) and the ingress over them."""
    from ray import serve

    r = cfg.ray
    scaling = ({"autoscaling_config": {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                       "target_ongoing_requests": r.target_ongoing_requests}}
               if r.max_replicas > r.min_replicas else {"num_replicas": r.min_replicas})
    view_options = {"num_cpus": r.view.cpus, "num_gpus": r.view.gpus or 0, "resources": r.view.label(),
                    "runtime_env": {"env_vars": env}}
    def view_deployment(name: str) -> Any:
        return serve.deployment(ViewReplica, name=f"{name}-view", max_ongoing_requests=r.max_ongoing_requests,
                                ray_actor_options=view_options, **scaling)

    if views.adapter is not None:
        both = view_deployment(HYBRID).bind(str(views.folders[FAST]), HYBRID, cfg.engine, str(views.adapter))
        bound = dict.fromkeys(EXPERTS, both)
    else:
        bound = {expert: view_deployment(expert).bind(str(views.folders[expert]), expert, cfg.engine)
                 for expert in EXPERTS}
    ingress = serve.deployment(serve.ingress()(HybridIngress), name="ingress", num_replicas=r.ingress_replicas,
                               max_ongoing_requests=max(r.max_ongoing_requests, 1000),
                               ray_actor_options={"num_cpus": r.ingress.cpus, "num_gpus": r.ingress.gpus or 0,
                                                  "resources": r.ingress.label(), "runtime_env": {"env_vars": env}})
    return ingress.bind(cfg, checkpoint, bound["think"], bound["fast"])


def run_on_ray(cfg: ServeConfig, checkpoint: str, views: ServedViews, env: dict[str, str]) -> str:
    """Deploy on the running Ray cluster (serve.run waits until every replica is up); returns the API's URL."""
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_application(cfg, checkpoint, views, env), name=cfg.ray.app_name, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}/v1"
