"""What the server counts: requests, tokens, thinking ratio and latency per expert, on /metrics and in the log.

/metrics is Prometheus' text format (prometheus_client, its own registry: vLLM's engine metrics
stay out of it). Every finished request is also one line of output_dir/requests.jsonl, and while
requests come a summary line goes to the log every `log_every_s` seconds:

    serve: 3 requests in 5 s (0.6/s), thinking 67%; fast 1 (12.0 tokens, p50 0.84 s), think 2 (31.5 tokens, p50 1.93 s)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Optional

from home_rl.experts import EXPERTS, THINK

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


@dataclasses.dataclass
class RequestRecord:
    """One finished request, as requests.jsonl holds it."""
    id: str
    endpoint: str  # chat | completion
    expert: str  # who answered
    forced: bool  # the request named its expert (no router decision)
    think_probability: Optional[float]  # the router's P(think); None when forced
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # arrival to the last token
    first_token_s: Optional[float]  # arrival to the first generated text
    stream: bool
    finish_reasons: list
    time: float = dataclasses.field(default_factory=time.time)


class ServeMetrics:
    def __init__(self, requests_log: Optional[Path] = None, log_every_s: float = 30.0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series beside every counter: the scrape shows what is counted
        self.registry = CollectorRegistry()
        by_expert = ("expert",)
        self.requests = Counter("home_requests", "Requests answered, by expert and by who chose it (router or request)",
                                ("expert", "chosen_by"), registry=self.registry)
        self.errors = Counter("home_request_errors", "Requests refused or failed, by HTTP status", ("status",),
                              registry=self.registry)
        self.prompt_tokens = Counter("home_prompt_tokens", "Prompt tokens, by expert", by_expert,
                                     registry=self.registry)
        self.completion_tokens = Counter("home_completion_tokens", "Generated tokens, by expert", by_expert,
                                         registry=self.registry)
        self.latency = Histogram("home_request_latency_seconds", "Arrival to last token, by expert", by_expert,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("home_time_to_first_token_seconds", "Arrival to first generated text, by expert",
                                     by_expert, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("home_requests_in_flight", "Requests being generated, by expert", by_expert,
                               registry=self.registry)
        self.thinking_ratio = Gauge("home_thinking_ratio", "Share of the router's decisions that went to think",
                                    registry=self.registry)
        for expert in EXPERTS:  # every series exists from the start, at zero
            for chosen_by in ("router", "request"):
                self.requests.labels(expert, chosen_by)
            for metric in (self.prompt_tokens, self.completion_tokens, self.latency, self.first_token, self.in_flight):
                metric.labels(expert)
        self.routed = {expert: 0 for expert in EXPERTS}
        self.requests_log, self.log_every_s = requests_log, log_every_s
        self._lock = threading.Lock()
        self._window: list[RequestRecord] = []
        self._window_start = time.monotonic()
        if requests_log is not None:
            requests_log.parent.mkdir(parents=True, exist_ok=True)

    def started(self, expert: str) -> None:
        self.in_flight.labels(expert).inc()

    def finished(self, record: RequestRecord) -> None:
        """Count a request whose generation ended (started() was called for it)."""
        e = record.expert
        self.in_flight.labels(e).dec()
        self.requests.labels(e, "request" if record.forced else "router").inc()
        self.prompt_tokens.labels(e).inc(record.prompt_tokens)
        self.completion_tokens.labels(e).inc(record.completion_tokens)
        self.latency.labels(e).observe(record.latency_s)
        if record.first_token_s is not None:
            self.first_token.labels(e).observe(record.first_token_s)
        with self._lock:
            if not record.forced:
                self.routed[e] += 1
                self.thinking_ratio.set(self.routed[THINK] / sum(self.routed.values()))
            if self.requests_log is not None:
                with self.requests_log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(dataclasses.asdict(record)) + "\n")
            self._window.append(record)
        log.debug("request %s: %s, %d+%d tokens, %.2f s", record.id, e, record.prompt_tokens,
                  record.completion_tokens, record.latency_s)

    def failed(self, status: int, expert: Optional[str] = None) -> None:
        """Count a refused request (expert None) or a generation that failed (started() was called for it)."""
        self.errors.labels(str(status)).inc()
        if expert is not None:
            self.in_flight.labels(expert).dec()

    def abandoned(self, expert: str) -> None:
        """A generation that ended in an error counted elsewhere (failed() with no expert)."""
        self.in_flight.labels(expert).dec()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def summary_due(self) -> Optional[str]:
        """The summary line of the requests since the last one, once log_every_s has passed (None otherwise)."""
        now = time.monotonic()
        with self._lock:
            if not self.log_every_s or now - self._window_start < self.log_every_s or not self._window:
                return None
            window, seconds = self._window, now - self._window_start
            self._window, self._window_start = [], now
        return summary_line(window, seconds)


def summary_line(records: list[RequestRecord], seconds: float) -> str:
    routed = [r for r in records if not r.forced]
    thinking = sum(r.expert == THINK for r in routed) / len(routed) if routed else None
    parts = []
    for expert in EXPERTS:
        mine = [r for r in records if r.expert == expert]
        if mine:
            latencies = sorted(r.latency_s for r in mine)
            parts.append(f"{expert} {len(mine)} ({sum(r.completion_tokens for r in mine) / len(mine):.1f} tokens, "
                         f"p50 {latencies[len(latencies) // 2]:.2f} s)")
    ratio = f", thinking {thinking:.0%}" if thinking is not None else ""
    return (f"serve: {len(records)} requests in {seconds:.0f} s ({len(records) / seconds:.1f}/s){ratio}; "
            + ", ".join(parts))
