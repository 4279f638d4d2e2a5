"""Workloads (synthetic distributions, seeding) and the trace loaders on hand-made fixtures."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from orchestrator.sim.traces import estimate_tokens
from orchestrator.sim.workload import WorkloadError, load_workload, parse_workload

ROOT = Path(__file__).resolve().parents[3]
TRACES = ROOT / "cluster_configs" / "sim" / "traces"


def _synthetic(**over):
    raw = {
        "name": "t", "seed": 7,
        "arrival": {"process": "poisson", "rate_rps": 10.0},
        "prompt_tokens": {"dist": "fixed", "value": 100},
        "output_tokens": {"dist": "uniform", "low": 1, "high": 9},
    }
    raw.update(over)
    return parse_workload(raw)


def test_synthetic_is_seeded_and_ordered():
    a = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in _synthetic().requests(500)]
    b = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in _synthetic().requests(500)]
    c = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in _synthetic(seed=8).requests(500)]
    assert a == b and a != c
    times = [x[0] for x in a]
    assert times == sorted(times)
    assert {x[1] for x in a} == {100}
    assert {x[2] for x in a} == set(range(1, 10))


def test_poisson_and_gamma_rates_and_burstiness():
    n = 40000
    for cv in (1.0, 3.0):
        arrival = {"process": "gamma", "rate_rps": 50.0, "cv": cv} if cv != 1.0 else {"process": "poisson",
                                                                                   "rate_rps": 50.0}
        reqs = list(_synthetic(arrival=arrival).requests(n))
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:], strict=False)]
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(1 / 50.0, rel=0.03)
        assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.06)


def test_lognormal_median_and_clip():
    reqs = list(_synthetic(prompt_tokens={"dist": "lognormal", "median": 500, "sigma": 1.2, "min": 8,
                                          "max": 4000}).requests(20000))
    lens = sorted(r.prompt_tokens for r in reqs)
    assert lens[0] >= 8 and lens[-1] <= 4000
    assert lens[-1] == 4000  # the clip is reached with sigma 1.2
    assert statistics.median(lens) == pytest.approx(500, rel=0.05)


def test_empirical_weights():
    reqs = list(_synthetic(output_tokens={"dist": "empirical", "values": [10, 1000], "weights": [3, 1]})
                .requests(20000))
    frac = sum(r.output_tokens == 10 for r in reqs) / len(reqs)
    assert frac == pytest.approx(0.75, abs=0.015)


@pytest.mark.parametrize("bad, needle", [
    ({"arrival": {"process": "poisson", "rate_rps": 0}}, "rate_rps"),
    ({"arrival": {"process": "weibull", "rate_rps": 1}}, "weibull"),
    ({"prompt_tokens": {"dist": "uniform", "low": 5, "high": 2}}, "high"),
    ({"prompt_tokens": {"dist": "lognormal", "median": 5}}, "sigma"),
    ({"output_tokens": {"dist": "fixed", "value": 0}}, "output_tokens.value"),
    ({"output_tokens": {"dist": "zipf"}}, "zipf"),
    ({"seed": "x"}, "seed"),
])
def test_bad_synthetic_specs_name_the_field(bad, needle):
    with pytest.raises(WorkloadError, match=needle):
        _synthetic(**bad)


def _trace(fmt, name, **opts):
    return parse_workload({"name": name, "trace": {"format": fmt, "path": name, **opts}}, TRACES)


def test_azure_2023_and_2024():
    reqs = list(_trace("azure", "azure_code_2023_sample.csv").requests())
    assert len(reqs) == 10
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)
    assert reqs[5].arrival_s == reqs[6].arrival_s  # equal timestamps kept
    assert (reqs[0].prompt_tokens, reqs[0].output_tokens) == (4711, 12)
    reqs24 = list(_trace("azure", "azure_conv_2024_sample.csv").requests())
    assert len(reqs24) == 8 and reqs24[-1].prompt_tokens == 1  # 0-token context raised to 1
    assert reqs24[-1].arrival_s == pytest.approx(4.1 - 0.013224, abs=1e-6)


def test_burstgpt_skips_failed_and_filters_model():
    reqs = list(_trace("burstgpt", "burstgpt_sample.csv").requests())
    assert [r.prompt_tokens for r in reqs] == [472, 1087, 1360, 2203, 36, 719]
    assert reqs[1].arrival_s == 40.0
    chat = list(_trace("burstgpt", "burstgpt_sample.csv", model="ChatGPT").requests())
    assert len(chat) == 5
    with_failed = list(_trace("burstgpt", "burstgpt_sample.csv", keep_failed=True).requests())
    assert len(with_failed) == 7 and with_failed[2].output_tokens == 1


def test_mooncake_ms_timestamps_and_scaling():
    reqs = list(_trace("mooncake", "mooncake_sample.jsonl").requests())
    assert [r.arrival_s for r in reqs] == [0.0, 0.0, 3.052, 3.052, 7.415]
    assert reqs[2].prompt_tokens == 13262
    fast = list(_trace("mooncake", "mooncake_sample.jsonl", time_scale=0.5).requests())
    assert fast[-1].arrival_s == pytest.approx(7.415 / 2)
    target = list(_trace("mooncake", "mooncake_sample.jsonl", target_rate_rps=4.0).requests())
    assert (len(target) - 1) / target[-1].arrival_s == pytest.approx(4.0)


def test_trace_loop_repeats_in_time():
    reqs = list(_trace("mooncake", "mooncake_sample.jsonl", loop=True).requests(12))
    assert len(reqs) == 12
    assert [r.request_id for r in reqs] == list(range(12))
    times = [r.arrival_s for r in reqs]
    assert times == sorted(times) and times[5] > times[4]
    assert reqs[5].prompt_tokens == reqs[0].prompt_tokens


def test_sharegpt_pairs_and_estimate():
    reqs = list(_trace("sharegpt", "sharegpt_sample.json", rate_rps=2.0).requests())
    assert len(reqs) == 3  # the conversation without a reply is skipped
    # the system turn is part of the prompt of the second conversation
    sys_and_q = estimate_tokens("You are a helpful assistant.\nWhat is 1234 + 5678?")
    assert reqs[1].prompt_tokens == sys_and_q
    assert reqs[1].output_tokens == estimate_tokens("1234 + 5678 = 6912.")
    assert reqs[2].output_tokens > reqs[0].output_tokens


def test_estimate_tokens_rules():
    assert estimate_tokens("") == 1
    assert estimate_tokens("hello world") == 2  # two short words, the space merges
    assert estimate_tokens("internationalization") == 4  # ceil(20 letters / 6)
    assert estimate_tokens("1234567") == 3  # digit groups of up to 3
    assert estimate_tokens("a, b.") == 4  # a , b .
    assert estimate_tokens("日本語") == 3
    text = "The quick brown fox jumps over the lazy dog. " * 20
    # ~10 tokens per sentence for BPE tokenizers; the estimate lands close
    assert 9 * 20 <= estimate_tokens(text) <= 12 * 20


@pytest.mark.parametrize("content, needle", [
    ("TIMESTAMP,ContextTokens\n1,2\n", "GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nnot-a-time,1,1\n", ":2: cannot read timestamp"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,x,1\n", ":2: column 'ContextTokens'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n5,1,1\n3,1,1\n", "backwards"),
])
def test_bad_azure_files(tmp_path, content, needle):
    p = tmp_path / "t.csv"
    p.write_text(content)
    with pytest.raises(WorkloadError, match=needle):
        list(load_workload(p).requests())


def test_bad_mooncake_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 3, "output_length": 1}\n{oops\n')
    with pytest.raises(WorkloadError, match=r"t.jsonl:2: not JSON"):
        list(load_workload(p).requests())


def test_load_workload_yaml_and_bare_trace(tmp_path):
    spec = load_workload(TRACES / "mooncake_sample.jsonl")
    assert spec.is_trace and len(list(spec.requests())) == 5
    (tmp_path / "w.yaml").write_text(
        "name: w\narrival: {process: constant, rate_rps: 4}\nprompt_tokens: 10\noutput_tokens: 3\n")
    w = load_workload(tmp_path / "w.yaml")
    reqs = list(w.requests(4))
    assert [r.arrival_s for r in reqs] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert w.with_rate(8.0).rate_rps == 8.0
    assert w.mean_lengths(100) == (10.0, 3.0)
    with pytest.raises(WorkloadError, match="not found"):
        load_workload(tmp_path / "missing.yaml")
    assert math.isclose(list(w.with_rate(8.0).requests(1))[0].arrival_s, 0.125)
