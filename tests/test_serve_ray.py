"""The Ray Serve backend of recipes/serve.py on the session's local Ray runtime: the same API and the same router
decisions as the local backend (and as recipes/evaluate.py), the same api_key check, a deployment per view with the
config's autoscaling bounds, and no vLLM engine left once Serve shuts down."""
from __future__ import annotations

import time

import pytest
from test_serve import ENGINE, chat_messages, eval_rows, free_port


def engine_processes() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if "EngineCore" in (p.info["name"] or "")}


def test_ray_serve_backend(stage_run, ray_local, tmp_path):
    import openai
    from openai import OpenAI
    from ray import serve
    from ray.serve.context import _get_global_client

    from home_rl.config import load_config
    from home_rl.serve.config import ServeConfig
    from home_rl.serve.engines import export_views
    from home_rl.serve.ray_serve import run_on_ray

    port = free_port()
    cfg = load_config(ServeConfig, [f"checkpoint={stage_run['final']}", f"port={port}", f"output_dir={tmp_path}",
                                    "backend=ray", "ray.max_replicas=2", "ray.target_ongoing_requests=4",
                                    "ray.view.cpus=0.5", "ray.ingress.cpus=0.5", "api_key=ray-key", *ENGINE])
    views = export_views(stage_run["final"], tmp_path / "views")
    before = engine_processes()
    try:
        url = run_on_ray(cfg, str(stage_run["final"]), views, {})
        status = serve.status().applications["home"]
        assert {"ingress", "think-view", "fast-view"} <= set(status.deployments)
        assert all(d.status == "HEALTHY" for d in status.deployments.values())
        with pytest.raises(openai.AuthenticationError):  # the ingress asks for the key as the local server does
            OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120).models.list()
        client = OpenAI(base_url=url, api_key="ray-key", max_retries=0, timeout=120)
        rows = eval_rows(stage_run)
        for row in rows[:2] + [r for r in rows if r["hybrid"] == "think"][:1]:
            reply = client.chat.completions.create(model="home", messages=chat_messages(row), max_tokens=3,
                                                   temperature=0)
            assert reply.model_extra["home"]["expert"] == row["hybrid"]
        chunks = list(client.chat.completions.create(model="home", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=3, stream=True, extra_body={"expert": "think"}))
        assert chunks and all(c.model_extra["home"]["expert"] == "think" for c in chunks)
        details = ray_local.get(_get_global_client()._controller.get_serve_instance_details.remote())
        for name in ("think-view", "fast-view"):  # what `serve status` shows of each view's deployment
            deployment = details["applications"]["home"]["deployments"][name]
            scaling = deployment["deployment_config"]["autoscaling_config"]
            assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 2, 4)
            assert deployment["deployment_config"]["max_ongoing_requests"] == 256
            assert sum(r["state"] == "RUNNING" for r in deployment["replicas"]) == 1
    finally:
        serve.shutdown()
    deadline = time.monotonic() + 60
    while engine_processes() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not engine_processes() - before, "vLLM engines outlived their replicas"
