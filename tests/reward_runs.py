"""Shared by the reward tests: JSONL rows, a one-step GRPO config on a tiny HOME model, and a real HTTP reward
server on 127.0.0.1 that stops by itself."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from home_rl.rollout.config import RolloutConfig
from home_rl.trainer.grpo_think import GRPOThinkConfig

FIXTURES = Path(__file__).parent / "fixtures_reward"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_config(home: Path, out: Path, data: Path, sources: dict, steps: int, prompts_per_step: int,
                stratify_by: str = "data_source") -> GRPOThinkConfig:
    """A tiny GRPO run on `data`: 4 samples of 12 tokens per prompt, one learner, one reward worker, no evaluation."""
    cfg = GRPOThinkConfig()
    cfg.model.path, cfg.model.dtype = str(home), "float32"
    cfg.output_dir = str(out)
    cfg.data.path, cfg.data.max_prompt_tokens = str(data), 512
    cfg.data.prompts_per_step, cfg.data.stratify_by, cfg.data.shuffle = prompts_per_step, stratify_by, False
    cfg.rollout = RolloutConfig(n=4, max_response_tokens=12, dtype="float32", kv_cache_gib=0.5, max_model_len=768,
                                temperature=1.0, stop=[])
    cfg.reward.num_workers = 1
    cfg.reward.sources = sources
    cfg.learner.num_learners, cfg.learner.lr, cfg.learner.micro_batch_size = 1, 1e-3, 8
    cfg.algorithm.kl_coef = 0.0  # no reference pass: these runs are about rewards
    cfg.algorithm.filter_zero_variance = False  # constant rewards make every group zero-variance: train anyway
    cfg.trainer.total_steps, cfg.trainer.save_every, cfg.trainer.log_every = steps, 1, 1
    cfg.trainer.learnability_check = False  # the steps alone score: the tests count what reached the verifiers
    cfg.eval.rows = 0
    return cfg


def read_metrics(out: Path) -> list[dict]:
    """The steps' metrics (step 0, the learnability check before the first step, left out)."""
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["step"] > 0]


class RewardServer:
    """A reward server on 127.0.0.1 (a free port) in daemon threads: `answer(path, body) -> (status, json)`.

    Records every request body per path; a handler that waits uses `self.release` (set on close), and the
    server closes itself after `lifetime_s`, so a test that dies cannot leave it behind.
    """

    def __init__(self, answer: Callable[[str, dict], tuple[int, dict]], lifetime_s: float = 600.0):
        self.requests: dict[str, list[dict]] = {}
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.setdefault(self.path, []).append(body)
                status, payload = answer(self.path, body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self._timer = threading.Timer(lifetime_s, self.close)
        self._timer.daemon = True
        self._timer.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
