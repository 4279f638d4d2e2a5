"""Serving configs over the locally built checkpoint: vLLM pools, native pools, or both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def pool(name: str, role: str, engine: str, **engine_overrides: Any) -> dict[str, Any]:
    return {"name": name, "role": role, "replicas": 1, "hardware": "cpu",
            "placement": {"num_gpus": 0, "num_cpus": 1},
            "engine": {"kind": engine, "num_kv_blocks": 64, "max_batch_size": 8, **engine_overrides}}


def serving_config(ckpt: Path, pools: list[dict[str, Any]], out: Path, *, lease_s: float = 30.0,
                   threshold_tokens: int = 16) -> Any:
    """Write a serving YAML (float32, bf16 linears and KV: the numerics both engines share) and load it."""
    from orchestrator.config import load_config

    doc = {
        "model": {"name": "tiny-llama", "path": str(ckpt), "shape": "tiny", "dtype": "float32",
                  "linear_mode": "bf16", "kv_dtype": "bf16", "block_size": 32, "max_model_len": 512},
        "pools": pools,
        "routing": {"kind": "threshold", "threshold_tokens": threshold_tokens},
        "sla": {"default": "standard", "classes": [{"name": "standard", "ttft_ms": 60000, "tpot_ms": 10000}]},
        "kv_transport": {"kind": "grpc", "lease_s": lease_s, "deadline_s": 60},
        "frontend": {"host": "127.0.0.1", "port": 0},
    }
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(out)
