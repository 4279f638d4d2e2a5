"""`tandem simulate` and `tandem plan` end to end (small runs), the planner's pieces and outputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config.loader import load_config
from orchestrator.core.types import LinearMode
from orchestrator.sim.planner import Candidate, PlanningError, PlanQuestion, SLATarget, pareto, plan
from orchestrator.sim.workload import load_workload

ROOT = Path(__file__).resolve().parents[3]
SIM = ROOT / "cluster_configs" / "sim"
SERVING = SIM / "serving" / "h100-prefill-gaudi2-decode.yaml"


def test_simulate_json_on_a_trace(capsys, tmp_path):
    rc = main(["simulate", "--config", str(SERVING), "--workload", str(SIM / "traces" / "mooncake_sample.jsonl"),
               "--json", "--plot", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 5 and out["finished"] == 5
    assert out["ttft_ms"]["p50"] > 0 and out["energy_j"] > 0
    assert sum(out["decisions"].values()) == 5
    assert {p.name for p in tmp_path.iterdir()} == {"ttft_cdf.png", "tpot_cdf.png", "power.png"}
    assert all(p.stat().st_size > 1000 for p in tmp_path.iterdir())


def test_simulate_table_with_requests_and_rate(capsys):
    rc = main(["simulate", "--config", str(SERVING), "--workload", str(SIM / "workloads" / "chat-poisson.yaml"),
               "--requests", "200", "--rate", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "TTFT ms" in out and "routing decisions by reason" in out and "200 (200 / 0)" in out


@pytest.mark.parametrize("argv, needle", [
    (["--workload", "missing.yaml"], "not found"),
    (["--workload", str(SIM / "workloads" / "chat-poisson.yaml"), "--requests", "0"], "--requests"),
    (["--workload", str(SIM / "workloads" / "chat-poisson.yaml"), "--rate", "-1"], "--rate"),
])
def test_simulate_bad_input_exits_2_with_a_message(capsys, argv, needle):
    assert main(["simulate", "--config", str(SERVING), *argv]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("text, want", [
    ("ttft_ms=1000,tpot_ms=100", SLATarget(1000, 100, 99)),
    ("ttft=1.5s,tpot=80ms,p=95", SLATarget(1500, 80, 95)),
])
def test_sla_parse(text, want):
    assert SLATarget.parse(text) == want


@pytest.mark.parametrize("text", ["ttft_ms=1000", "ttft_ms=x,tpot_ms=1", "foo=1,ttft_ms=1,tpot_ms=1", "p=100,ttft=1,tpot=1"])
def test_sla_parse_errors(text):
    with pytest.raises(PlanningError):
        SLATarget.parse(text)


def _cand(cost, power):
    return Candidate(None, "gaudi2", LinearMode.FP8_DYNAMIC, None, 0, 1, cost, power, power, 1.0, 1.0, 0.0, 1.0)


def test_pareto_keeps_only_non_dominated():
    pts = [_cand(1, 10), _cand(2, 5), _cand(2, 7), _cand(3, 6), _cand(4, 1), _cand(1.5, 10)]
    front = pareto(pts)
    assert [(c.cost_per_hour_usd, c.avg_power_w) for c in front] == [(1, 10), (2, 5), (4, 1)]
    for c in pts:
        if c not in front:
            assert any(f.cost_per_hour_usd <= c.cost_per_hour_usd and f.avg_power_w <= c.avg_power_w for f in front)


def _question(**over):
    q = dict(workload=load_workload(SIM / "workloads" / "chat-poisson.yaml"),
             sla=SLATarget(ttft_ms=1500, tpot_ms=60, percentile=95), rate_rps=10.0,
             hardware=("h100-sxm", "gaudi2"), thresholds=(0,), modes=(LinearMode.FP8_DYNAMIC,),
             verify_top=2, verify_requests=400, sample_requests=3000, max_replicas=16)
    q.update(over)
    return PlanQuestion(**q)


def test_plan_small_question_writes_loadable_yamls(tmp_path):
    from orchestrator.sim.plan_output import plot_plan, write_ray_yaml, write_serving_yaml

    planner, result = plan(_question())
    chosen = result.chosen
    assert chosen is not None and chosen.verified
    assert chosen.sim["ttft_ms_q"] <= 1500 and chosen.sim["tpot_ms_q"] <= 60
    # every verified candidate was simulated; the chosen one is the cheapest that met the SLA
    assert all(c.sim for c in result.verified)
    assert chosen.cost_per_hour_usd == min(c.cost_per_hour_usd for c in result.verified if c.verified)
    serving = write_serving_yaml(planner, chosen, tmp_path / "plan-serving.yaml")
    cfg = load_config(serving)
    assert sum(p.replicas for p in cfg.pools) == chosen.n_prefill + chosen.n_decode
    assert {p.hardware for p in cfg.pools} == {h for h in (chosen.prefill_hw, chosen.decode_hw) if h}
    ray = yaml.safe_load(write_ray_yaml(planner, chosen, tmp_path / "plan-ray.yaml").read_text())
    workers = {k: v for k, v in ray["available_node_types"].items() if k != "head"}
    assert sum(v["min_workers"] for v in workers.values()) == chosen.n_prefill + chosen.n_decode
    assert ray["max_workers"] == chosen.n_prefill + chosen.n_decode
    png = plot_plan(result, tmp_path / "pareto.png")
    assert png.stat().st_size > 1000


def test_more_traffic_needs_a_bigger_fleet():
    _, low = plan(_question(verify_top=1, verify_requests=200))
    _, high = plan(_question(rate_rps=60.0, verify_top=1, verify_requests=200))
    lo = low.screened[0]
    hi = high.screened[0]
    assert hi.n_prefill + hi.n_decode > lo.n_prefill + lo.n_decode
    assert hi.cost_per_hour_usd > lo.cost_per_hour_usd


def test_power_budget_excludes_hungry_fleets():
    _, free = plan(_question(rate_rps=30.0, verify_top=1, verify_requests=200))
    budget = sorted(c.avg_power_w for c in free.screened)[len(free.screened) // 2]
    _, capped = plan(_question(rate_rps=30.0, verify_top=1, verify_requests=200, power_budget_w=budget))
    assert capped.screened and all(c.avg_power_w <= budget for c in capped.screened)
    assert len(capped.screened) < len(free.screened)
    assert dataclasses.asdict(capped.question)["power_budget_w"] == budget


def test_impossible_sla_is_a_planning_error():
    with pytest.raises(PlanningError, match="relax the SLA"):
        plan(_question(sla=SLATarget(ttft_ms=1, tpot_ms=0.5)))


def test_plan_cli_json(capsys, tmp_path):
    rc = main(["plan", "--workload", str(SIM / "workloads" / "chat-poisson.yaml"), "--sla", "ttft_ms=1500,tpot_ms=60,p=95",
               "--rate", "10", "--hardware", "h100,gaudi2", "--thresholds", "0", "--modes", "fp8-dynamic",
               "--verify-top", "1", "--verify-requests", "200", "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["chosen"]["verified"] is True
    assert (tmp_path / "plan-serving.yaml").exists() and (tmp_path / "plan-ray.yaml").exists()
    assert main(["plan", "--workload", str(SIM / "workloads" / "chat-poisson.yaml"), "--sla", "ttft_ms=1",
                 "--rate", "10"]) == 2
