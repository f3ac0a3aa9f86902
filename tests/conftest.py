"""Session-wide fixtures: tiny models and tiny HOME checkpoints are built once, Ray is started once,
for the whole test run."""
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
def tiny_home(tiny_model, tmp_path_factory):
    """tiny_home('qwen2' | 'qwen2_5_vl', **upcycle_options) -> folder of a HOME checkpoint upcycled from
    tiny_model(arch), built once per session and options. It is shared: a test that changes a checkpoint
    copies it first (shutil.copytree). Each call checks that no earlier test changed it (where tests run as
    root, read-only files would not stop one)."""
    import torch

    from home_rl.model import upcycle

    root = tmp_path_factory.mktemp("tiny_homes")
    built: dict[tuple, tuple[Path, dict]] = {}

    def stamp(folder: Path) -> dict:
        return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}

    def get(arch: str, **options) -> Path:
        key = (arch, *sorted(options.items()))
        if key not in built:
            name = "-".join([arch] + [f"{k}={v}" for k, v in sorted(options.items())])
            torch.manual_seed(0)  # the router's random init: the same checkpoint whichever test asks first
            folder = upcycle(tiny_model(arch), **options).save_pretrained(root / name)
            built[key] = folder, stamp(folder)
        folder, files = built[key]
        if stamp(folder) != files:
            pytest.fail(f"an earlier test changed the shared checkpoint {folder}: copy it before changing it")
        return folder

    return get


@pytest.fixture(scope="session")
def stage_run(tiny_home, ray_local, tmp_path_factory):
    """The router stage and the hybrid evaluation on a tiny Qwen2.5-VL, once per session (tests/router_runs.py):
    {"home", "final" (the trained router's checkpoint), "out", "eval", "report"}."""
    from router_runs import run_stage

    return run_stage(tiny_home, tmp_path_factory)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime shared by every test that needs one (CPU actors, extra logical CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
