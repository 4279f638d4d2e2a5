"""The capacity planner: the cheapest (or lowest-power) fleet that meets an SLA at a rate.

Search space: prefill hardware (or none: colocated) × decode hardware × linear mode (FP8 or
bf16) × local-prefill threshold (threshold routing: prompts ≥ t prefill remotely) × pool sizes.

1. Screen analytically (fast, every candidate), from a sample of the workload and the core's
   cost model:
   - prefill pool: M/G/1 per worker at λ·f_remote/n_p with service S = prefill_time(hw_p, s);
     Pollaczek–Khinchine mean wait Wq = λ_w E[S²] / (2(1 − ρ)); TTFT_q ≈ Wq + S_q + exposed
     transfer + one decode step (S_q: the q-quantile of the service time). A heuristic: adding
     the wait's own q-quantile instead of its mean predicted 1,469 ms where simulation gave 617 ms
     (docs/planning-example.md's fleet); with the mean it predicts 624 ms;
   - local prefill on decode workers: the same M/G/1 on the decode worker's time left by decoding,
     plus two decode steps (the one in flight and the first);
   - decode pool: Little's law fixed point B = (λ/n_d)·m̄·tpot(B), tpot(B) = step(B, s̄ + m̄/2) /
     (1 − u_local), u_local the share of a decode worker's time spent on local prefills;
     B must fit the batch limit and the KV cache (B·(s̄ + m̄) tokens);
   - power: idle + busy share × (phase power − idle) per worker; cost: Σ price_per_hour × replicas.
   Infeasible when a utilization reaches `MAX_UTIL`, a predicted quantile misses the SLA, or the
   average power exceeds the budget.
2. Verify the best few by simulation (the same simulator, router and admission as `tandem
   simulate`), growing the bottleneck pool until the SLA holds at its percentile (or giving up).
3. Rank, keep the Pareto frontier of (cost, power), and write the chosen plan as a serving YAML
   and a `ray up` YAML (`orchestrator.sim.plan_output`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.config.loader import parse_config
from orchestrator.config.models import TandemConfig
from orchestrator.core.cost_model import CostModel
from orchestrator.core.hardware import HardwareCatalog, Phase
from orchestrator.core.model_shape import get_shape
from orchestrator.core.types import KVDtype, LinearMode, TandemError
from orchestrator.sim.build import SimOptions, build_simulation
from orchestrator.sim.fleet import percentile
from orchestrator.sim.workload import WorkloadSpec

MAX_UTIL = 0.85  # never plan a pool busier than this on average
DEFAULT_THRESHOLDS = (0, 1024, 4096)
DECODE_MAX_BATCH = 256


class PlanningError(TandemError, ValueError):
    """The planning question cannot be answered as asked (the message says what to change)."""


@dataclass(frozen=True)
class SLATarget:
    ttft_ms: float
    tpot_ms: float
    percentile: float = 99.0

    @classmethod
    def parse(cls, text: str) -> SLATarget:
        """`ttft_ms=1000,tpot_ms=100[,percentile=99]` (also `ttft=1s`, `tpot=80ms`, `p=95`)."""
        vals: dict[str, float] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise PlanningError(f"--sla: expected key=value, got {part!r} (e.g. ttft_ms=1000,tpot_ms=100)")
            k, v = (x.strip().lower() for x in part.split("=", 1))
            scale = 1.0
            if v.endswith("ms"):
                v = v[:-2]
            elif v.endswith("s"):
                v, scale = v[:-1], 1000.0
            try:
                num = float(v) * scale
            except ValueError:
                raise PlanningError(f"--sla: {k} is not a number: {v!r}") from None
            key = {"ttft": "ttft_ms", "ttft_ms": "ttft_ms", "tpot": "tpot_ms", "tpot_ms": "tpot_ms",
                   "p": "percentile", "percentile": "percentile"}.get(k)
            if key is None:
                raise PlanningError(f"--sla: unknown key {k!r} (ttft_ms, tpot_ms, percentile)")
            vals[key] = num / scale if key == "percentile" else num
        if "ttft_ms" not in vals or "tpot_ms" not in vals:
            raise PlanningError("--sla needs both ttft_ms and tpot_ms (e.g. ttft_ms=1000,tpot_ms=100)")
        t = cls(**vals)
        if not (t.ttft_ms > 0 and t.tpot_ms > 0 and 0 < t.percentile < 100):
            raise PlanningError(f"--sla: targets must be > 0 and the percentile in (0, 100), got {t}")
        return t


@dataclass(frozen=True)
class Candidate:
    """One fleet and its predicted (and, once verified, simulated) figures."""

    prefill_hw: str | None  # None: colocated, no prefill pool
    decode_hw: str
    linear_mode: LinearMode
    threshold_tokens: int | None  # None: colocated (context-ttft routing, all local)
    n_prefill: int
    n_decode: int
    cost_per_hour_usd: float
    avg_power_w: float
    peak_power_w: float
    pred_ttft_ms: float
    pred_tpot_ms: float
    prefill_util: float
    decode_batch: float
    verified: bool | None = None  # None: not simulated
    sim: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        pf = f"{self.n_prefill}×{self.prefill_hw} + " if self.prefill_hw else ""
        thr = "colocated" if self.threshold_tokens is None else f"remote≥{self.threshold_tokens}"
        return f"{pf}{self.n_decode}×{self.decode_hw} {self.linear_mode.value} {thr}"

    def key(self) -> tuple:
        return (self.prefill_hw, self.decode_hw, self.linear_mode, self.threshold_tokens, self.n_prefill, self.n_decode)


@dataclass
class PlanQuestion:
    workload: WorkloadSpec
    sla: SLATarget
    rate_rps: float
    hardware: tuple[str, ...]
    model_shape: str = "llama-3.1-8b-shape"
    power_budget_w: float | None = None
    objective: str = "cost"  # or "power"
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    modes: tuple[LinearMode, ...] = (LinearMode.FP8_DYNAMIC, LinearMode.BF16)
    max_replicas: int = 64
    verify_top: int = 3
    verify_requests: int = 3000
    sample_requests: int = 20000
    max_model_len: int = 32768


class _Sample:
    """Workload sample: sorted prompts with prefix sums of a per-prompt quantity."""

    def __init__(self, workload: WorkloadSpec, n: int) -> None:
        pairs = [(r.prompt_tokens, r.output_tokens) for r in workload.requests(n)]
        if not pairs:
            raise PlanningError(f"workload {workload.name!r} yields no requests")
        pairs.sort()
        self.prompts = [p for p, _ in pairs]
        self.n = len(pairs)
        self.mean_prompt = sum(self.prompts) / self.n
        self.mean_output = sum(o for _, o in pairs) / self.n

    def split(self, threshold: int) -> int:
        """Index of the first prompt ≥ threshold (prompts before it prefill locally)."""
        return bisect.bisect_left(self.prompts, threshold)


class Planner:
    def __init__(self, q: PlanQuestion, catalog: HardwareCatalog | None = None) -> None:
        self.q = q
        self.catalog = catalog or HardwareCatalog.load_default()
        unknown = [h for h in q.hardware if h not in self.catalog]
        if unknown:
            raise PlanningError(f"unknown hardware {', '.join(unknown)}; catalog: {', '.join(sorted(self.catalog))}")
        if not q.rate_rps > 0:
            raise PlanningError(f"--rate must be > 0, got {q.rate_rps}")
        self.cm = CostModel(get_shape(q.model_shape), self.catalog)
        self.sample = _Sample(q.workload.with_rate(q.rate_rps), q.sample_requests)
        self._svc: dict[tuple[str, LinearMode], list[float]] = {}

    # ------------------------------------------------------------------ analytic screen

    def _service(self, hw: str, mode: LinearMode) -> list[float]:
        key = (hw, mode)
        if key not in self._svc:
            memo: dict[int, float] = {}
            out = []
            for s in self.sample.prompts:
                t = memo.get(s)
                if t is None:
                    t = memo[s] = self.cm.prefill_time_s(hw, s, linear_mode=mode)
                out.append(t)
            self._svc[key] = out
        return self._svc[key]

    def _prefill_pool(self, hw: str, mode: LinearMode, lo: int, decode_hw: str, n_max: int
                      ) -> tuple[int, float, float] | None:
        """Smallest prefill pool for prompts[lo:]: (replicas, TTFT_q ms, utilization) or None."""
        svc = self._service(hw, mode)[lo:]
        if not svc:
            return 0, 0.0, 0.0
        frac = len(svc) / self.sample.n
        es = sum(svc) / len(svc)
        es2 = sum(s * s for s in svc) / len(svc)
        s_q = percentile(sorted(svc), self.q.sla.percentile)
        p_max = self.sample.prompts[-1]
        tail = (self.cm.exposed_transfer_time_s(hw, p_max, KVDtype.FP8_E4M3, linear_mode=mode)
                + self.cm.decode_step_time_s(decode_hw, [p_max], linear_mode=mode, kv_dtype=KVDtype.FP8_E4M3))
        lam = self.q.rate_rps * frac
        for n in range(max(1, math.ceil(lam * es / MAX_UTIL)), n_max + 1):
            lam_w = lam / n
            rho = lam_w * es
            if rho >= MAX_UTIL:
                continue
            wq = lam_w * es2 / (2.0 * (1.0 - rho))
            ttft_ms = (wq + s_q + tail) * 1e3
            if ttft_ms <= self.q.sla.ttft_ms:
                return n, ttft_ms, rho
        return None

    def _decode_pool(self, hw: str, mode: LinearMode, hi: int, n_max: int) -> tuple[int, float, float, float] | None:
        """Smallest decode pool (local prefill of prompts[:hi]): (replicas, TPOT ms, batch, local TTFT_q ms)."""
        smp = self.sample
        cap_tokens = self.cm.kv_capacity_tokens(hw, KVDtype.FP8_E4M3, mode)
        per_seq = smp.mean_prompt + smp.mean_output
        ctx = int(smp.mean_prompt + smp.mean_output / 2)
        local = self._service(hw, mode)[:hi]
        local_work = self.q.rate_rps * (sum(local) / smp.n if local else 0.0)  # seconds of prefill per second
        local_q_s = percentile(sorted(local), self.q.sla.percentile) if local else 0.0
        local_es = sum(local) / len(local) if local else 0.0
        local_es2 = sum(x * x for x in local) / len(local) if local else 0.0
        for n in range(1, n_max + 1):
            u_local = local_work / n
            if u_local >= MAX_UTIL:
                continue
            lam_w = self.q.rate_rps / n
            b = 1.0
            ok = False
            for _ in range(60):
                bi = max(1, min(DECODE_MAX_BATCH, math.ceil(b)))
                step = self.cm.decode_step_time_s(hw, [ctx] * bi, linear_mode=mode, kv_dtype=KVDtype.FP8_E4M3)
                tpot = step / (1.0 - u_local)
                nb = lam_w * smp.mean_output * tpot
                if abs(nb - b) < 0.01 * max(1.0, b):
                    b = nb
                    ok = True
                    break
                b = nb
                if b > DECODE_MAX_BATCH:
                    break
            if not ok or b > DECODE_MAX_BATCH * MAX_UTIL or b * per_seq > cap_tokens * MAX_UTIL:
                continue
            # local prefills queue on the decode worker (M/G/1 as for a prefill pool) behind the
            # decode step in flight: TTFT_q ≈ Wq + S_q + two steps
            wq = 0.0
            if local and u_local > 0:
                wq = (local_work / local_es / n) * local_es2 / (2.0 * (1.0 - u_local))
            local_ttft_ms = (wq + local_q_s + 2 * step) * 1e3
            if tpot * 1e3 > self.q.sla.tpot_ms * 0.9 or (local and local_ttft_ms > self.q.sla.ttft_ms):
                continue
            return n, tpot * 1e3, b, local_ttft_ms if local else 0.0
        return None

    def screen(self) -> list[Candidate]:
        """Every feasible candidate the analytic model finds, best objective first."""
        out: list[Candidate] = []
        hws = self.q.hardware
        n_max = self.q.max_replicas
        for mode in self.q.modes:
            for dhw in hws:
                layouts: list[tuple[str | None, int | None]] = [(None, None)]
                layouts += [(phw, t) for phw in hws for t in self.q.thresholds]
                for phw, thr in layouts:
                    hi = self.sample.n if thr is None else self.sample.split(thr)
                    dec = self._decode_pool(dhw, mode, hi, n_max)
                    if dec is None:
                        continue
                    n_d, tpot_ms, batch, local_ttft = dec
                    if phw is None:
                        n_p, ttft_ms, rho = 0, local_ttft, 0.0
                    else:
                        pre = self._prefill_pool(phw, mode, hi, dhw, n_max)
                        if pre is None:
                            continue
                        n_p, remote_ttft, rho = pre
                        if n_p == 0:
                            continue  # nothing goes remote: the colocated layout covers it
                        ttft_ms = max(remote_ttft, local_ttft if hi > 0 else 0.0)
                    for extra_p, extra_d in ((0, 0), (1, 0), (0, 1), (1, 1)):
                        if phw is None and extra_p:
                            continue
                        c = self._candidate(phw, dhw, mode, thr, n_p + extra_p, n_d + extra_d, ttft_ms, tpot_ms,
                                            rho * n_p / max(1, n_p + extra_p), batch * n_d / (n_d + extra_d), hi)
                        if self.q.power_budget_w is None or c.avg_power_w <= self.q.power_budget_w:
                            out.append(c)
        out.sort(key=self._objective)
        return out

    def _candidate(self, phw: str | None, dhw: str, mode: LinearMode, thr: int | None, n_p: int, n_d: int,
                   ttft_ms: float, tpot_ms: float, rho_p: float, batch: float, hi: int) -> Candidate:
        cm = self.cm
        d = self.catalog[dhw]
        power = n_d * cm.power_w(dhw, Phase.DECODE, min(1.0, batch))  # busy ≈ min(1, batch) of the time
        peak = n_d * max(cm.power_w(dhw, Phase.DECODE, 1.0), cm.power_w(dhw, Phase.PREFILL, 1.0))
        cost = n_d * d.price_per_hour_usd
        if phw is not None:
            p = self.catalog[phw]
            power += n_p * (cm.power_w(phw, Phase.IDLE, 0.0) + rho_p * (p.prefill_power_w - p.idle_w))
            peak += n_p * cm.power_w(phw, Phase.PREFILL, 1.0)
            cost += n_p * p.price_per_hour_usd
        return Candidate(phw, dhw, mode, thr, n_p, n_d, cost, power, peak, ttft_ms, tpot_ms, rho_p, batch)

    def _objective(self, c: Candidate) -> tuple:
        if self.q.objective == "power":
            return (c.avg_power_w, c.cost_per_hour_usd, c.label)
        return (c.cost_per_hour_usd, c.avg_power_w, c.label)

    # ------------------------------------------------------------------ verification

    def serving_dict(self, c: Candidate) -> dict[str, Any]:
        """The serving YAML (as a dict) of a candidate: loadable by `load_config`."""
        q = self.q
        pools: list[dict[str, Any]] = []
        if c.prefill_hw is not None:
            pools.append({"name": "prefill", "role": "prefill", "replicas": c.n_prefill, "hardware": c.prefill_hw,
                          "placement": placement_of(c.prefill_hw)})
        pools.append({"name": "decode", "role": "decode", "replicas": c.n_decode, "hardware": c.decode_hw,
                      "placement": placement_of(c.decode_hw), "engine": {"max_batch_size": DECODE_MAX_BATCH}})
        routing: dict[str, Any] = ({"kind": "context-ttft"} if c.threshold_tokens is None
                                   else {"kind": "threshold", "threshold_tokens": c.threshold_tokens})
        raw: dict[str, Any] = {
            "model": {"name": q.model_shape, "linear_mode": c.linear_mode.value, "kv_dtype": "fp8_e4m3",
                      "block_size": 16, "max_model_len": q.max_model_len},
            "pools": pools,
            "routing": routing,
            "sla": {"default": "planned", "classes": [{"name": "planned", "ttft_ms": q.sla.ttft_ms,
                                                       "tpot_ms": q.sla.tpot_ms, "percentile": q.sla.percentile}]},
            "admission": {"max_waiting": 100000, "default_queue_cap": 100000, "reject_unreachable_sla": False},
        }
        if q.power_budget_w is not None:
            raw["power"] = {"cluster_w": q.power_budget_w}
        return raw

    def config_of(self, c: Candidate) -> TandemConfig:
        return parse_config(self.serving_dict(c), f"<plan {c.label}>")

    def simulate(self, c: Candidate) -> Candidate:
        """Simulate the candidate; returns it with `verified` and the simulated figures set."""
        sim = build_simulation(self.config_of(c), cost_model=self.cm, options=SimOptions())
        rep = sim.run(self.q.workload.with_rate(self.q.rate_rps).requests(self.q.verify_requests))
        pct = self.q.sla.percentile
        ttft_q = percentile(rep.ttft_s_sorted, pct) * 1e3
        tpot_q = percentile(rep.tpot_s_sorted, pct) * 1e3 if rep.tpot_s_sorted else 0.0
        rejected_frac = rep.rejected / max(1, rep.requests)
        ok = ttft_q <= self.q.sla.ttft_ms and tpot_q <= self.q.sla.tpot_ms and rejected_frac <= 1 - pct / 100
        figures = {"ttft_ms_q": ttft_q, "tpot_ms_q": tpot_q, "sla_attainment": rep.sla_attainment,
                   "rejected_frac": rejected_frac, "avg_power_w": rep.avg_power_w, "peak_power_w": rep.peak_power_w,
                   "energy_per_token_j": rep.energy_per_token_j, "requests": rep.requests,
                   "decisions": rep.decisions}
        return replace(c, verified=ok, sim=figures)

    def verify(self, ranked: list[Candidate], max_bumps: int = 3) -> list[Candidate]:
        """Simulate the best `verify_top` distinct layouts, growing the bottleneck pool on a miss."""
        done: list[Candidate] = []
        seen_layouts: set[tuple] = set()
        for c in ranked:
            layout = c.key()[:4]
            if layout in seen_layouts:
                continue
            seen_layouts.add(layout)
            cur = self.simulate(c)
            bumps = 0
            while not cur.verified and bumps < max_bumps:
                bumps += 1
                tpot_miss = cur.sim["tpot_ms_q"] > self.q.sla.tpot_ms
                if cur.prefill_hw is None or tpot_miss or c.threshold_tokens is None:
                    nxt = replace(cur, n_decode=cur.n_decode + 1)
                else:
                    nxt = replace(cur, n_prefill=cur.n_prefill + 1)
                nxt = self._candidate(nxt.prefill_hw, nxt.decode_hw, nxt.linear_mode, nxt.threshold_tokens,
                                      nxt.n_prefill, nxt.n_decode, nxt.pred_ttft_ms, nxt.pred_tpot_ms,
                                      nxt.prefill_util, nxt.decode_batch, 0)
                if self.q.power_budget_w is not None and nxt.avg_power_w > self.q.power_budget_w:
                    break
                cur = self.simulate(nxt)
            done.append(cur)
            if len(done) >= self.q.verify_top:
                break
        done.sort(key=lambda x: (not x.verified, *self._objective(x)))
        return done


def placement_of(hw: str) -> dict[str, Any]:
    """Ray placement of one replica on `hw`: one GPU for NVIDIA parts, one `HPU` (the resource
    Ray's Gaudi support registers) for Gaudi, plus a custom resource named after the hardware key."""
    if hw.startswith("gaudi"):
        return {"num_gpus": 0, "resources": {"HPU": 1, hw: 1}}
    return {"num_gpus": 1, "resources": {hw: 1}}


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Candidates not dominated in (cost per hour, average power): cheapest first."""
    front: list[Candidate] = []
    best_power = math.inf
    for c in sorted(cands, key=lambda c: (c.cost_per_hour_usd, c.avg_power_w)):
        if c.avg_power_w < best_power:
            front.append(c)
            best_power = c.avg_power_w
    return front


@dataclass(frozen=True)
class PlanResult:
    question: PlanQuestion
    screened: list[Candidate]
    verified: list[Candidate]
    frontier: list[Candidate]

    @property
    def chosen(self) -> Candidate | None:
        ok = [c for c in self.verified if c.verified]
        return ok[0] if ok else None


def plan(q: PlanQuestion, catalog: HardwareCatalog | None = None) -> tuple[Planner, PlanResult]:
    """Screen, verify, and rank. Raises PlanningError when nothing passes the analytic screen."""
    planner = Planner(q, catalog)
    screened = planner.screen()
    if not screened:
        budget = f" within {q.power_budget_w:.0f} W" if q.power_budget_w is not None else ""
        raise PlanningError(
            f"no fleet of up to {q.max_replicas} replicas per pool of {', '.join(q.hardware)} meets "
            f"TTFT p{q.sla.percentile:g} ≤ {q.sla.ttft_ms:g} ms and TPOT ≤ {q.sla.tpot_ms:g} ms at "
            f"{q.rate_rps:g} req/s{budget}: relax the SLA, lower the rate, raise --max-replicas or the budget")
    verified = planner.verify(screened)
    return planner, PlanResult(q, screened, verified, pareto(screened))
