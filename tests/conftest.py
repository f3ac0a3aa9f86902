"""Session-wide fixtures: tiny models are built once, Ray is started once, for the whole test run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep every test process lean on this 2-core machine and keep vLLM in-process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model('qwen2' | 'llama' | 'qwen2_5_vl') -> folder of a tiny random fp32 model (built once)."""
    from home_rl.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime shared by every test that needs one (CPU actors, extra logical CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
