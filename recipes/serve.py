"""Serve a HOME checkpoint behind an OpenAI-compatible API; the router picks think or fast per request.

    python recipes/serve.py                                   # outputs/router/final on http://127.0.0.1:8000/v1
    python recipes/serve.py checkpoint=HOME_DIR port=8001
    python recipes/serve.py checkpoint=HOME_DIR backend=ray ray.max_replicas=4   # Ray Serve, replicas per view

Endpoints: /v1/chat/completions (streaming too), /v1/completions, /v1/models, /health, /metrics
(Prometheus). A body may force the expert with "expert": "think" | "fast" | "auto"; every response
carries "home": {"expert", "think_probability", "chosen_by"}, and a chat answer's think trace comes as
message.reasoning_content, apart from the answer in message.content.
"""
from __future__ import annotations

from home_rl.cli import run_recipe
from home_rl.serve.config import ServeConfig


def main(cfg: ServeConfig) -> None:
    from home_rl.serve.run import serve

    serve(cfg)


if __name__ == "__main__":
    run_recipe(main, ServeConfig)
