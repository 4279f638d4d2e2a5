"""Build a simulation from a serving config: the fleet, the core's objects, the cost model.

`build_simulation(config)` is the one entry point the CLI, the planner, the benchmark and the
tests use. It creates the same core objects the runtime creates for the same config (router,
admission, power accountant, cost model) and hands them to `CoreBridge`; the simulator itself
only sees the bridge and three cost-model calls.

Mechanics the config does not fix (stated here, used by every run):
- decode batch size: `engine.max_batch_size`, else `DEFAULT_MAX_NUM_SEQS`;
- prefill batch token budget: `SimOptions.max_batch_tokens` (a longer prompt runs alone);
- KV blocks: `engine.num_kv_blocks`, else the cost model's `kv_capacity_tokens` / block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.config.models import TandemConfig
from orchestrator.core.hardware import HardwareCatalog
from orchestrator.core.hardware import Phase as PowerPhase
from orchestrator.core.model_shape import get_shape
from orchestrator.core.power import PowerAccountant
from orchestrator.core.types import Role
from orchestrator.sim.bridge import CoreBridge
from orchestrator.sim.costs import SimCosts
from orchestrator.sim.fleet import SimWorker
from orchestrator.sim.simulator import Simulator

DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class SimOptions:
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    power_bucket_s: float = 1.0
    record_timeline: bool = False  # keep every fleet power change (tests; memory grows with the run)
    record_decisions: bool = False  # keep (request, decode, prefill, reason) per routing decision
    record_route_calls: bool = False  # keep a copy of every (snapshot, request) handed to the router


def worker_id(pool: str, replica: int) -> str:
    """The id of replica i of a pool, as the runtime names its actors: `<pool>-<i>`."""
    return f"{pool}-{replica}"


def make_cost_model(config: TandemConfig, catalog: HardwareCatalog | None = None) -> Any:
    """The core's CostModel for the config's model shape over the default (or given) catalog."""
    from orchestrator.core.cost_model import CostModel

    catalog = catalog or HardwareCatalog.load_default()
    return CostModel(get_shape(config.model.shape_name), catalog)


def build_fleet(config: TandemConfig, cost_model: Any, power: PowerAccountant,
                options: SimOptions) -> list[SimWorker]:
    """One SimWorker per replica, sorted by worker id (the snapshot's order)."""
    workers: list[SimWorker] = []
    for pool in config.pools:
        kv_dtype = config.pool_kv_dtype(pool)
        mode = config.pool_linear_mode(pool)
        block_size = config.pool_block_size(pool)
        if pool.engine.num_kv_blocks is not None:
            total_blocks = pool.engine.num_kv_blocks
        else:
            tokens = cost_model.kv_capacity_tokens(pool.hardware, kv_dtype, mode)
            total_blocks = max(1, int(tokens) // block_size)
        max_seqs = pool.engine.max_batch_size or DEFAULT_MAX_NUM_SEQS
        phase_w = (power.phase_w(pool.hardware, PowerPhase.IDLE), power.phase_w(pool.hardware, PowerPhase.PREFILL),
                   power.phase_w(pool.hardware, PowerPhase.DECODE))
        for i in range(pool.replicas):
            w = SimWorker(0, worker_id(pool.name, i), pool.name, pool.role, pool.hardware,
                          linear_mode=mode, kv_dtype=kv_dtype, block_size=block_size,
                          total_blocks=0 if pool.role is Role.PREFILL else total_blocks,
                          max_num_seqs=max_seqs, max_batch_tokens=options.max_batch_tokens,
                          power_by_phase=phase_w)
            w.extra["hardware_key"] = pool.hardware
            workers.append(w)
    workers.sort(key=lambda w: w.worker_id)
    for i, w in enumerate(workers):
        w.index = i
    return workers


def build_simulation(config: TandemConfig, *, cost_model: Any = None, catalog: HardwareCatalog | None = None,
                     options: SimOptions | None = None) -> Simulator:
    """A ready-to-run Simulator for `config` driving the core's router and admission."""
    options = options or SimOptions()
    cost_model = cost_model or make_cost_model(config, catalog)
    power = PowerAccountant(cost_model, config.power)
    workers = build_fleet(config, cost_model, power, options)
    bridge = CoreBridge(config, cost_model, power, workers, record_route_calls=options.record_route_calls)

    def sla_of(name: str | None) -> tuple[float, float]:
        c = config.sla_class(name)
        return c.ttft_ms / 1000.0, c.tpot_ms / 1000.0

    sim = Simulator(workers, bridge, SimCosts(cost_model), sla_of, power_bucket_s=options.power_bucket_s,
                    record_timeline=options.record_timeline, record_decisions=options.record_decisions,
                    link=bridge.link)
    return sim
