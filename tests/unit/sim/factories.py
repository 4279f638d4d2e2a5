"""Factories for the simulator's tests: serving configs as dicts, fleets built by the real code."""

from __future__ import annotations

import copy
from typing import Any

from orchestrator.config.loader import parse_config
from orchestrator.config.models import TandemConfig
from orchestrator.sim.build import SimOptions, build_simulation
from orchestrator.sim.simulator import Simulator
from orchestrator.sim.workload import SimRequest, parse_workload

BASE: dict[str, Any] = {
    "model": {"name": "llama-3.1-8b-shape", "linear_mode": "fp8-dynamic", "kv_dtype": "fp8_e4m3",
              "block_size": 16, "max_model_len": 32768},
    "pools": [
        {"name": "prefill", "role": "prefill", "replicas": 1, "hardware": "h100-sxm"},
        {"name": "decode", "role": "decode", "replicas": 1, "hardware": "gaudi2",
         "engine": {"max_batch_size": 64}},
    ],
    "routing": {"kind": "threshold", "threshold_tokens": 0},
    "sla": {"default": "standard", "classes": [{"name": "standard", "ttft_ms": 2000, "tpot_ms": 200}]},
    "admission": {"max_waiting": 100000, "default_queue_cap": 100000, "reject_unreachable_sla": False},
}


def make_spec(**over: Any) -> TandemConfig:
    """BASE with top-level sections replaced (`pools=[...]`, `routing={...}`, ...)."""
    raw = copy.deepcopy(BASE)
    for k, v in over.items():
        raw[k] = v
    return parse_config(raw, "<test>")


def make_sim(config: TandemConfig | None = None, cost_model: Any = None, **options: Any) -> Simulator:
    """A simulator over the real core (a fresh cost model unless one is given)."""
    return build_simulation(config or make_spec(), cost_model=cost_model, options=SimOptions(**options))


def make_requests(specs: list[tuple[float, int, int]]) -> list[SimRequest]:
    """(arrival_s, prompt_tokens, output_tokens) → SimRequests with ids 0..n-1."""
    return [SimRequest(i, t, p, o) for i, (t, p, o) in enumerate(specs)]


def poisson(rate_rps: float, prompt: Any, output: Any, n: int, seed: int = 0) -> list[SimRequest]:
    w = parse_workload({"seed": seed, "arrival": {"process": "poisson", "rate_rps": rate_rps},
                        "prompt_tokens": prompt, "output_tokens": output})
    return list(w.requests(n))
