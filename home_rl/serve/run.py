"""Starting the hybrid server (recipes/serve.py): the views, the router, the engines, the HTTP server.

    local  one process: the router and the HTTP API here, one vLLM engine process per view
    ray    Ray Serve on the running cluster (RAY_ADDRESS's, or a local one): home_rl/serve/ray_serve.py

The server runs until SIGINT or SIGTERM and then stops its engines; while it runs,
output_dir/server.json says where it listens ({"url", "pid"}). With an api_key (or HOME_RL_API_KEY), every
/v1/* route asks for it (home_rl/serve/app.py); config.yaml does not keep it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from home_rl import console
from home_rl.config import save_config
from home_rl.experts import EXPERTS
from home_rl.serve.config import ServeConfig

log = logging.getLogger(__name__)


def serve(cfg: ServeConfig) -> None:
    from home_rl.trainer.startup import load_processor, resolve_home_checkpoint

    cfg.check_host()  # load_config checked it; a config built in code is checked here
    checkpoint = resolve_home_checkpoint(cfg.checkpoint, "checkpoint", "recipes/train_router.py")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg.saved(), out)
    cfg.api_key = cfg.client_key()  # HOME_RL_API_KEY's, carried in the config to the server (a Ray replica too)
    if cfg.backend == "ray":
        return _serve_on_ray(cfg, checkpoint, out)

    import uvicorn

    from home_rl.model import HomeModel
    from home_rl.serve.app import HybridServer, build_app
    from home_rl.serve.engines import export_views, start_engines
    from home_rl.serve.metrics import ServeMetrics
    from home_rl.serve.router import PromptRouter, router_device

    start = time.perf_counter()
    home = HomeModel.from_pretrained(checkpoint)  # both views and the router come from it
    views = export_views(checkpoint, out / "views", home, adapter=cfg.engine.serves_adapter())
    router = PromptRouter(home, cfg.router.batch_size, router_device(cfg.router.device))
    del home
    what = "the fast view and think's adapter" if views.adapter else "think and fast views"
    console.phase_done("views", f"{what} in {out / 'views'}, router on {router.device}", start)
    engines: dict = {}
    sock = None
    try:
        start = time.perf_counter()
        _quiet_vllm_logging()
        with console.output_to("engines"):  # the engine processes write their output there for good
            engines = start_engines(views, cfg.engine)
        _quiet_vllm_logging()  # again: an engine's start configures vLLM's logging anew
        console.phase_done("engines", "one vLLM engine (the fast view, think's adapter per request) ready"
                           if views.adapter else f"{len(engines)} vLLM engines ready", start)
        server = HybridServer(cfg, load_processor(checkpoint), router, engines,
                              ServeMetrics(out / "requests.jsonl", cfg.log_every_s))
        sock = _bind(cfg.host, cfg.port)
        url = f"http://{cfg.host}:{sock.getsockname()[1]}/v1"
        _announce(out, url)
        log.info("serving %r on %s (Ctrl-C stops)", cfg.served_model_name, url)
        try:
            uvicorn.Server(uvicorn.Config(build_app(server), log_config=None, access_log=False)).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has stopped serving; stop the engines below
            pass
    finally:
        (out / "server.json").unlink(missing_ok=True)
        if sock is not None:
            sock.close()
        router.close()
        for engine in engines.values():
            engine.shutdown()
        log.info("server stopped")


def _serve_on_ray(cfg: ServeConfig, checkpoint: Path, out: Path) -> None:
    from ray import serve as ray_serve

    from home_rl.serve.engines import export_views
    from home_rl.serve.ray_serve import run_on_ray
    from home_rl.trainer.startup import ensure_ray

    start = time.perf_counter()
    views = export_views(checkpoint, out / "views", adapter=cfg.engine.serves_adapter())
    console.phase_done("views", f"{'the fast view and think adapter' if views.adapter else 'think and fast views'} "
                                f"in {out / 'views'}", start)
    r = cfg.ray
    ensure_ray(r.ingress.cpus * r.ingress_replicas + 2 * r.view.cpus * r.max_replicas)
    start = time.perf_counter()
    env = {"TOKENIZERS_PARALLELISM": "false", **console.actor_env()}
    try:
        url = run_on_ray(cfg, str(checkpoint), views, env)
        deployments = "one view deployment for both experts" if views.adapter else f"{len(EXPERTS)} view deployments"
        console.phase_done("ray serve", f"application {r.app_name!r}: ingress and {deployments}", start)
        _announce(out, url)
        log.info("serving %r on %s through Ray Serve (Ctrl-C stops)", cfg.served_model_name, url)
        threading.Event().wait()  # until SIGINT / SIGTERM (run_recipe turns SIGTERM into SystemExit)
    finally:
        (out / "server.json").unlink(missing_ok=True)
        ray_serve.delete(r.app_name)
        ray_serve.shutdown()
        log.info("server stopped")


def _announce(out: Path, url: str) -> None:
    """output_dir/server.json while the server runs: where it listens, and its pid."""
    (out / "server.json").write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from home_rl.errors import ConfigError

        raise ConfigError(f"port={port}: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def _quiet_vllm_logging() -> None:
    """In quiet mode vLLM's own console handler goes: its records reach driver.log like any library's."""
    if console.mode() != "quiet":
        return
    import importlib

    importlib.import_module("vllm")  # configures its logger on import
    vllm_log = logging.getLogger("vllm")
    vllm_log.handlers, vllm_log.propagate = [], True
