"""vLLM as a Tandem engine, with KV moved through Tandem's wire by a vLLM KV connector.

Read workers/vllm_engine/README.md first. Importing this package is light: `VLLMEngine` (which
imports vLLM) loads on first use, so the main test environment, which has no vLLM, can import
`layout` and `config`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VLLMEngine": "workers.vllm_engine.engine",
    "VLLMEngineConfig": "workers.vllm_engine.config",
    "VLLMConfigError": "workers.vllm_engine.config",
    "VLLMPagedLayout": "workers.vllm_engine.layout",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'workers.vllm_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def vllm_available() -> bool:
    """True when vLLM imports here (the CI installs it in its own virtual environment)."""
    try:
        importlib.import_module("vllm")
    except Exception:  # ImportError, or a broken install (e.g. CUDA torchvision beside CPU torch)
        return False
    return True


__all__ = sorted(_LAZY) + ["vllm_available"]
