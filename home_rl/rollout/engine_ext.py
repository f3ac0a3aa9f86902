"""What home-rl adds to a vLLM worker (`worker_extension_cls`): only what vLLM's API lacks.

New weights come through vLLM's weight-transfer API (home_rl.weights); this mixin reseeds the sampler and reads
the engine's parameters back for checks. vLLM imports it in every worker process, so importing it also registers
the `gloo` weight-transfer backend there (an engine in its own process, e.g. with tensor parallelism).
"""
from __future__ import annotations

import torch

from home_rl import vllm_names as vn
from home_rl.weights import gloo

gloo.register()


class WorkerExtension:
    """Mixed into vLLM's Worker; the engine calls these by name through `collective_rpc`."""

    def home_rl_seed(self, seed: int) -> None:
        """Reseed the sampler (it draws from the process's global generators)."""
        vn.set_random_seed(seed)

    def home_rl_get_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the engine's parameters by vLLM name (CPU-packed linear weights read as empty)."""
        params = dict(self.model_runner.get_model().named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"no such engine parameters: {unknown[:5]}; some are: {list(params)[:5]}")
        return {n: params[n].detach().to("cpu", copy=True) for n in names}
