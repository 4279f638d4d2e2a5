"""Workloads: the stream of requests a simulation replays.

A workload is an iterator of `SimRequest` in arrival order, either synthetic (seeded arrival
process × length distributions) or read from a trace (`orchestrator.sim.traces`). Workloads are
described by a small YAML/dict spec (see `cluster_configs/sim/workloads/`):

    name: chat
    seed: 0
    arrival: {process: poisson, rate_rps: 20}          # or {process: gamma, rate_rps: 20, cv: 2.0}
    prompt_tokens: {dist: lognormal, median: 800, sigma: 1.0, min: 16, max: 16384}
    output_tokens: {dist: uniform, low: 32, high: 512}
    sla_class: interactive                              # optional, passed to admission/router

or, for a trace:

    name: azure-conv
    trace: {format: azure, path: traces/azure_conv_sample.csv, time_scale: 1.0}

Relative trace paths resolve against the spec file's folder. Lengths are integers >= 1.
Generation is lazy: a million requests never sit in memory at once.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.types import TandemError


class WorkloadError(TandemError, ValueError):
    """A workload spec or trace file is malformed; the message names the field or line."""


class SimRequest:
    """One request of a workload. Mutable only through the simulator's bookkeeping fields."""

    __slots__ = (
        "request_id", "arrival_s", "prompt_tokens", "output_tokens", "sla_class",
        # set by the simulator
        "decode_worker", "prefill_worker", "blocks", "join_step", "first_token_s", "finish_s",
        "mark_s", "attempts", "reason",
    )

    def __init__(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
                 sla_class: str | None = None) -> None:
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.sla_class = sla_class
        self.decode_worker: Any = None
        self.prefill_worker: Any = None
        self.blocks = 0
        self.join_step = 0
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.mark_s = 0.0
        self.attempts = 0
        self.reason: Any = None

    def __repr__(self) -> str:
        return (f"SimRequest(id={self.request_id}, t={self.arrival_s:.6f}s, prompt={self.prompt_tokens}, "
                f"output={self.output_tokens})")


# ---------------------------------------------------------------- length distributions

LengthSampler = Callable[[random.Random], int]


def length_sampler(spec: dict[str, Any] | int, what: str) -> LengthSampler:
    """Build a sampler from a spec: an int (fixed) or {dist: fixed|uniform|lognormal|empirical, ...}.

    fixed: value. uniform: low, high (inclusive integers). lognormal: median, sigma, min (1), max.
    empirical: values (list of ints) and optional weights — or the same from a trace column.
    Raises WorkloadError naming `what` and the bad field.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = {"dist": "fixed", "value": spec}
    if not isinstance(spec, dict) or "dist" not in spec:
        raise WorkloadError(f"{what}: expected an integer or a mapping with 'dist', got {spec!r}")
    dist = spec["dist"]
    try:
        if dist == "fixed":
            v = _positive_int(spec["value"], f"{what}.value")
            return lambda rng: v
        if dist == "uniform":
            lo = _positive_int(spec["low"], f"{what}.low")
            hi = _positive_int(spec["high"], f"{what}.high")
            if hi < lo:
                raise WorkloadError(f"{what}: high ({hi}) < low ({lo})")
            return lambda rng: rng.randint(lo, hi)
        if dist == "lognormal":
            median = float(spec["median"])
            sigma = float(spec["sigma"])
            if not (median > 0 and sigma >= 0):
                raise WorkloadError(f"{what}: lognormal needs median > 0 and sigma >= 0")
            lo = _positive_int(spec.get("min", 1), f"{what}.min")
            hi = _positive_int(spec.get("max", 1 << 30), f"{what}.max")
            mu = math.log(median)

            def lognormal(rng: random.Random) -> int:  # clipped to [lo, hi]
                v = round(rng.lognormvariate(mu, sigma))  # an int, as int(round(x))
                return lo if v < lo else hi if v > hi else v

            # (read by _synthetic's fast path)
            lognormal.lognormal = (mu, sigma, lo, hi)  # type: ignore[attr-defined]
            return lognormal
        if dist == "empirical":
            values = [_positive_int(v, f"{what}.values[]") for v in spec["values"]]
            if not values:
                raise WorkloadError(f"{what}: empirical needs at least one value")
            weights = spec.get("weights")
            if weights is None:
                return lambda rng: values[int(rng.random() * len(values))]
            if len(weights) != len(values) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise WorkloadError(f"{what}: weights must be non-negative, one per value, not all zero")
            cum = list(itertools.accumulate(float(w) for w in weights))
            total = cum[-1]
            return lambda rng: values[bisect.bisect_right(cum, rng.random() * total)]
    except KeyError as e:
        raise WorkloadError(f"{what}: dist {dist!r} needs field {e.args[0]!r}") from None
    raise WorkloadError(f"{what}: unknown dist {dist!r} (fixed, uniform, lognormal, empirical)")


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise WorkloadError(f"{what} must be an integer >= 1, got {v!r}")
    return v


# ---------------------------------------------------------------- arrival processes

def interarrival_sampler(spec: dict[str, Any]) -> Callable[[random.Random], float]:
    """poisson: exponential gaps at rate_rps. gamma: gaps with mean 1/rate_rps and coefficient of
    variation cv (cv = 1 is Poisson; cv > 1 is burstier). constant: gaps of exactly 1/rate_rps."""
    process = spec.get("process", "poisson")
    rate = spec.get("rate_rps")
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not rate > 0:
        raise WorkloadError(f"arrival.rate_rps must be a number > 0, got {rate!r}")
    rate = float(rate)
    if process == "poisson":
        def poisson(rng: random.Random) -> float:
            return rng.expovariate(rate)

        poisson.poisson_rate = rate  # type: ignore[attr-defined]  # (_synthetic's fast path)
        return poisson
    if process == "gamma":
        cv = float(spec.get("cv", 1.0))
        if not cv > 0:
            raise WorkloadError(f"arrival.cv must be > 0, got {cv!r}")
        shape = 1.0 / (cv * cv)
        scale = 1.0 / (rate * shape)
        return lambda rng: rng.gammavariate(shape, scale)
    if process == "constant":
        gap = 1.0 / rate
        return lambda rng: gap
    raise WorkloadError(f"arrival.process: unknown {process!r} (poisson, gamma, constant)")


# ---------------------------------------------------------------- workload specs

@dataclass(frozen=True)
class WorkloadSpec:
    """A validated workload description. `requests()` yields a fresh, seeded stream each call."""

    name: str
    raw: dict[str, Any] = field(repr=False)
    base_dir: Path = Path(".")

    @property
    def is_trace(self) -> bool:
        return "trace" in self.raw

    @property
    def rate_rps(self) -> float | None:
        """The synthetic arrival rate, or None for a trace."""
        a = self.raw.get("arrival")
        return float(a["rate_rps"]) if a else None

    def with_rate(self, rate_rps: float) -> WorkloadSpec:
        """The same workload at another arrival rate (synthetic) or time-scaled to it (trace: the
        trace's mean rate is measured on its first 10,000 requests and its timestamps scaled)."""
        raw = dict(self.raw)
        if self.is_trace:
            trace = dict(raw["trace"])
            trace["target_rate_rps"] = float(rate_rps)
            raw["trace"] = trace
        else:
            raw["arrival"] = {**raw["arrival"], "rate_rps": float(rate_rps)}
        return WorkloadSpec(self.name, raw, self.base_dir)

    def requests(self, limit: int | None = None) -> Iterator[SimRequest]:
        """The request stream in arrival order (at most `limit` requests; synthetic is endless without)."""
        if self.is_trace:
            from orchestrator.sim.traces import trace_requests

            return trace_requests(self.raw["trace"], self.base_dir, limit, self.raw.get("sla_class"))
        return _synthetic(self.raw, limit)

    def mean_lengths(self, sample: int = 20000) -> tuple[float, float]:
        """(mean prompt tokens, mean output tokens) over the first `sample` requests."""
        n = p = o = 0
        for r in self.requests(sample):
            n += 1
            p += r.prompt_tokens
            o += r.output_tokens
        if n == 0:
            raise WorkloadError(f"workload {self.name!r} yields no requests")
        return p / n, o / n


def _synthetic(raw: dict[str, Any], limit: int | None) -> Iterator[SimRequest]:
    rng = random.Random(raw.get("seed", 0))
    gap = interarrival_sampler(raw["arrival"])
    prompt = length_sampler(raw["prompt_tokens"], "prompt_tokens")
    output = length_sampler(raw["output_tokens"], "output_tokens")
    sla = raw.get("sla_class")
    rate = getattr(gap, "poisson_rate", None)
    p, o = getattr(prompt, "lognormal", None), getattr(output, "lognormal", None)
    if rate is not None and p is not None and o is not None:
        return _poisson_lognormal(rng, rate, p, o, sla, limit)
    return _sampled(rng, gap, prompt, output, sla, limit)


def _sampled(rng: random.Random, gap: Callable[[random.Random], float], prompt: LengthSampler,
             output: LengthSampler, sla: str | None, limit: int | None) -> Iterator[SimRequest]:
    t = 0.0
    rid = 0
    while limit is None or rid < limit:
        t += gap(rng)
        yield SimRequest(rid, t, prompt(rng), output(rng), sla)
        rid += 1


def _poisson_lognormal(
    rng: random.Random, rate: float, p: tuple[float, float, int, int], o: tuple[float, float, int, int],
    sla: str | None, limit: int | None,
) -> Iterator[SimRequest]:
    """`_sampled` for Poisson arrivals and lognormal lengths, with `random.Random`'s expovariate and
    lognormvariate (Kinderman–Monahan normalvariate) written out: the very same draws from the same
    stream, without three method calls per number (tests/unit/sim/test_speed_paths.py compares)."""
    # (typed locals: native float arithmetic when compiled; nothing changes in CPython)
    uniform: Callable[[], float] = rng.random
    log: Callable[[float], float] = math.log
    exp: Callable[[float], float] = math.exp
    nv: float = random.NV_MAGICCONST  # type: ignore[attr-defined]
    p_mu, p_sigma, p_lo, p_hi = p
    o_mu, o_sigma, o_lo, o_hi = o
    t = 0.0
    u1: float
    u2: float
    z: float
    rid = 0
    while limit is None or rid < limit:
        t += -log(1.0 - uniform()) / rate  # rng.expovariate(rate)
        while True:  # rng.normalvariate(p_mu, p_sigma)
            u1 = uniform()
            u2 = 1.0 - uniform()
            z = nv * (u1 - 0.5) / u2
            if z * z / 4.0 <= -log(u2):
                break
        v = round(exp(p_mu + z * p_sigma))
        pv = p_lo if v < p_lo else p_hi if v > p_hi else v
        while True:
            u1 = uniform()
            u2 = 1.0 - uniform()
            z = nv * (u1 - 0.5) / u2
            if z * z / 4.0 <= -log(u2):
                break
        v = round(exp(o_mu + z * o_sigma))
        yield SimRequest(rid, t, pv, o_lo if v < o_lo else o_hi if v > o_hi else v, sla)
        rid += 1


def parse_workload(raw: dict[str, Any], base_dir: Path | str = ".", name: str | None = None) -> WorkloadSpec:
    """Validate a workload mapping (see the module docstring). Raises WorkloadError."""
    if not isinstance(raw, dict):
        raise WorkloadError(f"a workload must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    wname = str(raw.get("name") or name or "workload")
    if "trace" in raw:
        t = raw["trace"]
        if not isinstance(t, dict) or "format" not in t or "path" not in t:
            raise WorkloadError("trace: needs 'format' and 'path'")
        from orchestrator.sim.traces import LOADERS

        if t["format"] not in LOADERS:
            raise WorkloadError(f"trace.format: unknown {t['format']!r}; known: {', '.join(sorted(LOADERS))}")
    else:
        for key in ("arrival", "prompt_tokens", "output_tokens"):
            if key not in raw:
                raise WorkloadError(f"a synthetic workload needs {key!r} (or a 'trace' section)")
        interarrival_sampler(raw["arrival"])
        length_sampler(raw["prompt_tokens"], "prompt_tokens")
        length_sampler(raw["output_tokens"], "output_tokens")
        seed = raw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise WorkloadError(f"seed must be an integer, got {seed!r}")
    return WorkloadSpec(wname, raw, Path(base_dir))


def load_workload(path: str | Path) -> WorkloadSpec:
    """Load a workload YAML, or a bare trace file (format from the extension/name: *.jsonl →
    mooncake, *.json → sharegpt, *burst*.csv → burstgpt, other *.csv → azure)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise WorkloadError(f"workload file not found: {p}")
    if p.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise WorkloadError(f"{p}: not valid YAML: {e}") from None
        return parse_workload(raw, p.parent, p.stem)
    fmt = ("mooncake" if p.suffix == ".jsonl" else "sharegpt" if p.suffix == ".json"
           else "burstgpt" if "burst" in p.name.lower() else "azure")
    return parse_workload({"name": p.stem, "trace": {"format": fmt, "path": p.name}}, p.parent)
