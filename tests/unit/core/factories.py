"""Factories for core tests: configs, worker snapshots, the real cost model over the shipped catalog."""

from __future__ import annotations

import functools
from typing import Any

from orchestrator.config import TandemConfig, parse_config
from orchestrator.core.cost_model import CostModel
from orchestrator.core.hardware import HardwareCatalog
from orchestrator.core.model_shape import get_shape
from orchestrator.core.snapshot import ClusterSnapshot, RouteRequest, WorkerSnapshot
from orchestrator.core.types import Role

MODEL = {"name": "llama-3.1-8b-shape", "max_model_len": 32768}


@functools.lru_cache(maxsize=1)
def catalog() -> HardwareCatalog:
    return HardwareCatalog.load_default()


@functools.lru_cache(maxsize=4)
def cost_model(shape: str = "llama-3.1-8b-shape") -> CostModel:
    return CostModel(get_shape(shape), catalog())


def make_config(
    *,
    routing: dict[str, Any] | None = None,
    pools: list[dict[str, Any]] | None = None,
    power: dict[str, Any] | None = None,
    sla: dict[str, Any] | None = None,
    admission: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **extra: Any,
) -> TandemConfig:
    """A valid config: by default one H100 prefill pool and one Gaudi 2 decode pool, context-ttft."""
    data: dict[str, Any] = {
        "model": model or dict(MODEL),
        "pools": pools
        or [
            {"name": "prefill", "role": "prefill", "hardware": "h100-sxm", "replicas": 2},
            {"name": "decode", "role": "decode", "hardware": "gaudi2", "replicas": 2},
        ],
        "routing": routing or {"kind": "context-ttft"},
    }
    if power is not None:
        data["power"] = power
    if sla is not None:
        data["sla"] = sla
    if admission is not None:
        data["admission"] = admission
    data.update(extra)
    return parse_config(data, "<test>")


def worker(
    worker_id: str,
    pool: str,
    role: Role,
    hardware: str,
    *,
    free: int = 10_000,
    total: int = 10_000,
    block_size: int = 16,
    **kw: Any,
) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id, pool, role, hardware, free_kv_blocks=free, total_kv_blocks=total, block_size=block_size, **kw
    )


def prefill(worker_id: str = "p0", hardware: str = "h100-sxm", pool: str = "prefill", **kw: Any) -> WorkerSnapshot:
    return worker(worker_id, pool, Role.PREFILL, hardware, **kw)


def decode(worker_id: str = "d0", hardware: str = "gaudi2", pool: str = "decode", **kw: Any) -> WorkerSnapshot:
    return worker(worker_id, pool, Role.DECODE, hardware, **kw)


def snapshot(*workers: WorkerSnapshot, time_s: float = 0.0) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(workers), time_s=time_s)


def req(n: int, max_tokens: int = 64, rid: str | None = None, sla_class: str | None = None) -> RouteRequest:
    return RouteRequest(rid or f"r{n}", n, max_tokens, sla_class)
