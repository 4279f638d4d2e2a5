"""What a simulation measured: latency percentiles, goodput, SLA attainment, energy, power,
per-pool utilization and queueing, routing decisions by reason.

`Recorder` collects per-request figures in flat arrays during the run (no per-request objects
kept); `SimReport` is the frozen result, serialisable with `to_dict()` (the `--json` output).
Definitions:
- TTFT: arrival → first token (the end of the request's first decode step).
- TPOT: (finish − first token) / (output_tokens − 1), for requests with more than one token.
- E2E: arrival → last token.
- A request meets its SLA when its TTFT ≤ class.ttft_ms and its TPOT ≤ class.tpot_ms
  (one-token requests: TTFT only). Attainment = met / arrived (rejections count as misses).
  Goodput = met requests per second of simulated time (arrival of the first → last event).
- Energy per token: total fleet energy / output tokens emitted. Power: fleet average and peak.
- Utilization of a pool: busy seconds (prefill or decode phase) / (replicas × duration).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.sim.fleet import percentile
from orchestrator.sim.workload import SimRequest

if TYPE_CHECKING:
    from orchestrator.sim.simulator import Simulator

PERCENTILES = (50.0, 90.0, 95.0, 99.0)


class Recorder:
    """Per-request figures as they happen (called from the simulator's handlers)."""

    def __init__(self, sla_of: Callable[[str | None], tuple[float, float]]) -> None:
        self.sla_of = sla_of  # sla class → (ttft_s, tpot_s)
        self._sla_cache: dict[str | None, tuple[float, float]] = {}
        self.ttft_s = array("d")
        self.tpot_s = array("d")
        self.e2e_s = array("d")
        self.finished_ids: array | None = None
        self.met = 0
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.rejections: Counter[str] = Counter()
        self.rejected_ids: list[int] = []
        self.decisions: Counter[str] = Counter()
        self.queued_by_admission = 0

    def track_ids(self) -> None:
        """Also keep the id of every finished request (conservation checks in tests)."""
        self.finished_ids = array("q")

    def decided(self, reason: str) -> None:
        self.decisions[reason] += 1

    def rejected(self, req: SimRequest, reason: str) -> None:
        self.rejections[reason] += 1
        if self.finished_ids is not None:
            self.rejected_ids.append(req.request_id)

    def finished(self, req: SimRequest) -> None:
        ttft = req.first_token_s - req.arrival_s
        e2e = req.finish_s - req.arrival_s
        self.ttft_s.append(ttft)
        self.e2e_s.append(e2e)
        n = req.output_tokens
        self.output_tokens += n
        self.prompt_tokens += req.prompt_tokens
        sla = self._sla_cache.get(req.sla_class)
        if sla is None:
            sla = self._sla_cache[req.sla_class] = self.sla_of(req.sla_class)
        if n > 1:
            tpot = (req.finish_s - req.first_token_s) / (n - 1)
            self.tpot_s.append(tpot)
            if ttft <= sla[0] and tpot <= sla[1]:
                self.met += 1
        elif ttft <= sla[0]:
            self.met += 1
        if self.finished_ids is not None:
            self.finished_ids.append(req.request_id)

    def report(self, sim: Simulator, end_s: float) -> SimReport:
        return build_report(self, sim, end_s)


def _dist(values: array | list[float], presorted: bool = False) -> dict[str, float]:
    s = values if presorted else sorted(values)
    out = {f"p{int(q)}": percentile(s, q) * 1000.0 for q in PERCENTILES}
    out["mean"] = (math.fsum(s) / len(s) * 1000.0) if s else math.nan
    out["max"] = (s[-1] * 1000.0) if s else math.nan
    return out


@dataclass(frozen=True)
class PoolReport:
    pool: str
    role: str
    hardware: str
    replicas: int
    utilization: float
    energy_j: float
    mean_prefill_wait_ms: float
    mean_kv_wait_ms: float
    max_prefill_queue: int
    max_kv_queue: int
    prefill_batches: int
    decode_steps: int
    tokens_out: int


@dataclass(frozen=True)
class SimReport:
    """The result of one simulation. Latencies in ms, energy in J, power in W."""

    requests: int
    finished: int
    rejected: int
    rejections: dict[str, int]
    duration_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    sla_met: int
    sla_attainment: float
    goodput_rps: float
    throughput_tokens_per_s: float
    output_tokens: int
    energy_j: float
    energy_per_token_j: float
    avg_power_w: float
    peak_power_w: float
    decisions: dict[str, int]
    queued_by_admission: int
    pools: tuple[PoolReport, ...]
    events: int
    power_bucket_s: float
    power_w_over_time: tuple[float, ...] = field(repr=False)
    ttft_s_sorted: tuple[float, ...] = field(repr=False, default=())
    tpot_s_sorted: tuple[float, ...] = field(repr=False, default=())

    def to_dict(self, include_series: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["pools"] = [asdict(p) for p in self.pools]
        if not include_series:
            for k in ("power_w_over_time", "ttft_s_sorted", "tpot_s_sorted"):
                d.pop(k)
        return _finite(d)


def _finite(x: Any) -> Any:
    """JSON has no NaN: map non-finite floats to None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def build_report(rec: Recorder, sim: Simulator, end_s: float, keep_series: bool = True) -> SimReport:
    duration = max(end_s, 1e-12)
    fp = sim.fleet_power
    pools: dict[str, list] = {}
    for w in sim.workers:
        pools.setdefault(w.pool, []).append(w)
    pool_reports = []
    for name, ws in pools.items():
        pw = sum(w.prefill_waits for w in ws)
        kw = sum(w.reserve_waits for w in ws)
        pool_reports.append(PoolReport(
            pool=name, role=ws[0].role.value, hardware=str(ws[0].extra.get("hardware_key", ws[0].hardware)),
            replicas=len(ws), utilization=sum(w.busy_s for w in ws) / (len(ws) * duration),
            energy_j=sum(w.energy_j for w in ws),
            mean_prefill_wait_ms=(sum(w.prefill_wait_s for w in ws) / pw * 1000.0) if pw else 0.0,
            mean_kv_wait_ms=(sum(w.reserve_wait_s for w in ws) / kw * 1000.0) if kw else 0.0,
            max_prefill_queue=max(w.max_prefill_q for w in ws), max_kv_queue=max(w.max_reserve_q for w in ws),
            prefill_batches=sum(w.prefill_batches for w in ws), decode_steps=sum(w.decode_steps for w in ws),
            tokens_out=sum(w.tokens_out for w in ws),
        ))
    finished = len(rec.e2e_s)
    rejected = sum(rec.rejections.values())
    arrived = sim.arrived
    energy = fp.energy_j
    buckets = [e / fp.bucket_s for e in fp.buckets_j]
    if buckets:  # the last bucket is partial
        last_len = duration - (len(buckets) - 1) * fp.bucket_s
        if last_len > 0:
            buckets[-1] = fp.buckets_j[-1] / last_len
    ttft_sorted, tpot_sorted = sorted(rec.ttft_s), sorted(rec.tpot_s)
    return SimReport(
        requests=arrived, finished=finished, rejected=rejected, rejections=dict(rec.rejections),
        duration_s=end_s, ttft_ms=_dist(ttft_sorted, True), tpot_ms=_dist(tpot_sorted, True), e2e_ms=_dist(rec.e2e_s),
        sla_met=rec.met, sla_attainment=(rec.met / arrived) if arrived else math.nan,
        goodput_rps=rec.met / duration, throughput_tokens_per_s=rec.output_tokens / duration,
        output_tokens=rec.output_tokens, energy_j=energy,
        energy_per_token_j=(energy / rec.output_tokens) if rec.output_tokens else math.nan,
        avg_power_w=energy / duration, peak_power_w=fp.peak_w,
        decisions=dict(sorted(rec.decisions.items())), queued_by_admission=rec.queued_by_admission,
        pools=tuple(pool_reports), events=sim.loop.events_run, power_bucket_s=fp.bucket_s,
        power_w_over_time=tuple(buckets),
        ttft_s_sorted=tuple(ttft_sorted) if keep_series else (),
        tpot_s_sorted=tuple(tpot_sorted) if keep_series else (),
    )
