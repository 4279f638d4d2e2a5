"""Session-wide test setup.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, at import
of the first conftest, before any test module imports a kernel — but only on a machine without an
NVIDIA GPU: on a GPU machine the kernels run for real (tests marked `gpu`). Ray must stay on loopback.
"""

import os


def _has_nvidia_gpu() -> bool:
    # Decided without importing torch, so the variable is in place before anything else loads.
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


if not _has_nvidia_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
