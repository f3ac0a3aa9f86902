"""The router in front of the views: which expert answers a prompt, decided as `recipes/evaluate.py` decides.

The same features (`home_rl.router.features`: pooled hidden states after the router's layer of the
fast view, images included) and the same rule: think where P(think) is above the checkpoint's calibrated
threshold (home_rl/router/operating_point.py; a request's `reasoning_effort` picks another of its thresholds).
Only the layers up to the router's are kept: the forward stops there anyway, and the rest of the HOME model
(both experts of every later layer, the LM head) would be memory for nothing.

Requests that arrive together are routed together: a background thread takes whatever is waiting
(up to `router.batch_size` prompts) into one forward pass.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from home_rl.experts import FAST, THINK
from home_rl.resources import compute_dtype
from home_rl.router.operating_point import think_probabilities, threshold_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RouteDecision:
    expert: str  # the expert the router picks
    think_probability: Optional[float]  # softmax of the router's logits at think (None: the request chose)
    threshold: Optional[float] = None  # think where think_probability is above it (None: the request chose)


class PromptRouter:
    """Holds the HOME model's layers up to the router's, and routes router inputs (router_input dicts)."""

    def __init__(self, home: Any, batch_size: int = 8, device: str = "cpu"):
        """`home`: a HomeModel, which this router cuts down to the layers it reads."""
        from home_rl.model.architectures import decoder_layers

        layers = decoder_layers(home.base, home.arch)
        del layers[home.home_config["router_layer"] + 1:]  # never reached: router_features stops after its layer
        # float32 where the device only emulates bfloat16, as the router stage's actor computed the features
        self.home = home.to(device, compute_dtype(home.base.dtype, device)).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.trained = bool(home.home_config.get("router_trained"))
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="router", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, checkpoint: str | Path, batch_size: int = 8, device: str = "auto") -> "PromptRouter":
        from home_rl.model import HomeModel

        return cls(HomeModel.from_pretrained(checkpoint), batch_size, router_device(device))

    def threshold(self, effort: Optional[str] = None) -> float:
        """The P(think) above which a prompt thinks, at `effort` (None: the checkpoint's operating point)."""
        return threshold_of(self.home.home_config, effort)

    @torch.no_grad()
    def decide(self, items: list[dict], efforts: Optional[list[Optional[str]]] = None) -> list[RouteDecision]:
        """Decisions for router inputs, in order (one forward pass per batch_size prompts), each at its
        reasoning effort (None: the checkpoint's operating point)."""
        from home_rl.router.features import compute_features

        features = compute_features(self.home, items, self.batch_size, device=self.device)  # as the evaluation
        p_think = think_probabilities(self.home.router(features.to(self.device)).float().cpu())
        thresholds = [self.threshold(e) for e in (efforts or [None] * len(items))]
        return [RouteDecision(THINK if p > t else FAST, p, t) for p, t in zip(p_think, thresholds)]

    async def route(self, item: dict, effort: Optional[str] = None) -> RouteDecision:
        """The decision for one prompt, batched with whatever else waits."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(((item, effort), loop, future))
        return await future

    def close(self) -> None:
        self._queue.put(None)

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            waiting = [first]
            while len(waiting) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                waiting.append(item)
            try:
                decisions: list[Any] = self.decide([item for (item, _), _, _ in waiting],
                                                   [effort for (_, effort), _, _ in waiting])
            except Exception as e:  # noqa: BLE001  every waiting request gets the error, the thread goes on
                log.exception("router forward failed")
                decisions = [e] * len(waiting)
            for (_, loop, future), decision in zip(waiting, decisions):
                loop.call_soon_threadsafe(_settle, future, decision)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the request was cancelled (its client went away)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def router_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting

