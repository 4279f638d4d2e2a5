"""Serving YAMLs: every shipped file loads; bad files list every problem with its path and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.cli import main as tandem_main
from orchestrator.config import ConfigError, load_config, load_config_text, parse_config
from orchestrator.config.checks import cross_check
from orchestrator.core.types import KVDtype, Role

ROOT = Path(__file__).resolve().parents[3]
SERVING = sorted((ROOT / "cluster_configs" / "serving").glob("*.yaml"))


def test_the_required_files_ship():
    names = {p.name for p in SERVING}
    assert {
        "local-cpu.yaml",
        "local-cpu-colocated.yaml",
        "h100-prefill-gaudi2-decode.yaml",
        "h100-prefill-l4-decode.yaml",
        "power-capped.yaml",
    } <= names


@pytest.mark.parametrize("path", SERVING, ids=lambda p: p.name)
def test_every_serving_file_loads_and_every_key_is_commented(path):
    cfg = load_config(path)
    assert cfg.pools and cfg.served_model_name
    for i, line in enumerate(path.read_text().splitlines(), 1):
        body = line.split("#", 1)[0]
        if ":" in body:  # every line with a key carries a comment
            assert "#" in line, f"{path.name}:{i} has no comment: {line!r}"


def test_local_demo_pair_serves_the_same_model():
    dis = load_config(ROOT / "cluster_configs/serving/local-cpu.yaml")
    col = load_config(ROOT / "cluster_configs/serving/local-cpu-colocated.yaml")
    assert dis.model == col.model
    assert {p.role for p in dis.pools} == {Role.PREFILL, Role.DECODE}
    assert {p.role for p in col.pools} == {Role.BOTH}
    assert dis.frontend.host == col.frontend.host == "127.0.0.1"


def test_config_is_frozen():
    cfg = load_config(ROOT / "cluster_configs/serving/local-cpu.yaml")
    with pytest.raises(pydantic.ValidationError):
        cfg.model.max_model_len = 4  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.pools[0].replicas = 9  # type: ignore[misc]


FIELD_ERRORS = """\
model:
  name: tiny
  max_model_len: 512
pools:
  - name: p
    role: prefil
    hardware: cpu
  - name: d
    role: decode
    hardware: cpu
    replicas: 0
    colour: red
routing: {kind: threshold}
sla:
  classes: [{name: std, ttft_ms: -1, tpot_ms: 10}]
"""


def test_field_errors_are_all_listed_with_paths_and_lines():
    with pytest.raises(ConfigError) as ei:
        load_config_text(FIELD_ERRORS, "bad.yaml")
    got = {(p.path, p.line) for p in ei.value.problems}
    assert got == {
        ("pools[0].role", 6),
        ("pools[1].replicas", 11),
        ("pools[1].colour", 12),
        ("routing.threshold_tokens", 13),
        ("sla.classes[0].ttft_ms", 15),
    }
    text = str(ei.value)
    assert text.startswith("bad.yaml: 5 problem(s)")
    assert "pools[1].colour (line 12): unknown key" in text
    assert "'prefil'" in text


CROSS_ERRORS = """\
model: {name: tiny, max_model_len: 512}
pools:
  - {name: p, role: prefill, hardware: cpu}
  - {name: p, role: prefill, hardware: nosuch, engine: {kv_dtype: bf16, max_model_len: 256}}
routing: {kind: tiers, tiers: [{min_prompt_tokens: 0, pool: nope}]}
sla: {default: gold, classes: [{name: std, ttft_ms: 1, tpot_ms: 10}, {name: std, ttft_ms: 1, tpot_ms: 10}]}
power: {cluster_w: 1, pools: {zz: 5}}
admission: {queue_caps: {nope: 1}}
kv_transport: {auth_token_env: X, auth_token: y, link: fiber}
"""


def test_cross_section_errors_are_all_listed():
    with pytest.raises(ConfigError) as ei:
        load_config_text(CROSS_ERRORS, "cross.yaml")
    paths = [p.path for p in ei.value.problems]
    assert sorted(paths) == sorted(
        [
            "pools[1].name",
            "pools",
            "pools[1].engine.kv_dtype",
            "pools[1].engine.max_model_len",
            "pools[1].hardware",
            "kv_transport.link",
            "routing.tiers[0].pool",
            "sla.classes[1].name",
            "sla.default",
            "admission.queue_caps.nope",
            "power.pools.zz",
            "kv_transport.auth_token",
        ]
    )
    by_path = {p.path: p for p in ei.value.problems}
    assert by_path["pools[1].hardware"].line == 4
    assert "known: " in by_path["pools[1].hardware"].message and "h100-sxm" in by_path["pools[1].hardware"].message
    assert "decode" in by_path["pools"].message


def _base(**over):
    data = {
        "model": {"name": "tiny", "max_model_len": 512},
        "pools": [
            {"name": "p", "role": "prefill", "hardware": "cpu"},
            {"name": "d", "role": "decode", "hardware": "cpu"},
        ],
    }
    data.update(over)
    return data


def test_minimal_config_takes_defaults():
    cfg = parse_config(_base())
    assert cfg.routing.kind == "context-ttft"
    assert cfg.frontend.host == "127.0.0.1"
    assert cfg.sla_class(None).name == "standard"
    assert cfg.model.kv_dtype is KVDtype.FP8_E4M3
    assert cfg.disaggregated


@pytest.mark.parametrize(
    "over, path",
    [
        ({"power": {"cluster_w": 0}}, "power.cluster_w"),
        ({"power": {"cluster_w": 100, "pools": {"p": -1}}}, "power.pools"),
        ({"power": {"cluster_w": 9}}, "power.cluster_w"),  # below two CPUs' idle draw (2 × 5 W)
        ({"power": {"cluster_w": 100, "pools": {"p": 500}}}, "power.pools.p"),  # above the cluster budget
        ({"routing": {"kind": "power"}}, "routing.kind"),  # needs a power section
        ({"routing": {"kind": "tiers", "tiers": [{"min_prompt_tokens": 5, "pool": None}]}}, "routing.tiers"),
        ({"routing": {"kind": "teleport"}}, "routing"),
        ({"frontend": {"port": 70000}}, "frontend.port"),
        ({"model": {"name": "no-such-shape"}}, "model.name"),
        ({"model": {"name": "tiny", "max_model_len": 4096}}, "model.max_model_len"),  # > 512 positions
        ({"pools": [{"name": "d", "role": "decode", "hardware": "cpu", "placement": {"resources": {"x": -1}}}]},
         "pools[0].placement.resources"),
        ({"pools": [{"name": "p", "role": "prefill", "hardware": "cpu"}]}, "pools"),
        ({"kv_transport": {"kind": "carrier-pigeon"}}, "kv_transport.kind"),
        ({"kv_transport": {"tls": {"cert_path": "/c"}}}, "kv_transport.tls.key_path"),
        ({"kv_transport": {"port_range": [50100, 50100]}}, "kv_transport.port_range"),  # needs two ports
        ({"kv_transport": {"port_range": [80, 90]}}, "kv_transport.port_range"),  # privileged
        ({"kv_transport": {"port_range": [50100]}}, "kv_transport.port_range[1]"),
    ],
)
def test_each_rule_names_its_path(over, path):
    with pytest.raises(ConfigError) as ei:
        parse_config(_base(**over), "t")
    assert path in [p.path for p in ei.value.problems], str(ei.value)


def test_a_colocated_cluster_is_valid_and_not_disaggregated():
    cfg = parse_config(_base(pools=[{"name": "c", "role": "both", "hardware": "cpu", "replicas": 2}]))
    assert not cfg.disaggregated


def test_missing_catalog_is_tolerated():
    cfg = parse_config(_base())
    bad = cfg.model_copy(update={"pools": (cfg.pools[0].model_copy(update={"hardware": "nosuch"}), cfg.pools[1])})
    assert [p.path for p in cross_check(bad)] == ["pools[0].hardware"]
    assert cross_check(bad, catalog_loader=lambda: None) == []


def test_yaml_syntax_error_and_missing_file():
    with pytest.raises(ConfigError) as ei:
        load_config_text("model: {name: tiny\npools: [", "broken.yaml")
    assert ei.value.problems[0].path == "<yaml>" and ei.value.problems[0].line is not None
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/tandem.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_text("- just\n- a list\n")


def test_validate_config_cli_exit_codes(tmp_path, capsys):
    good = ROOT / "cluster_configs/serving/local-cpu.yaml"
    assert tandem_main(["validate-config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(FIELD_ERRORS)
    assert tandem_main(["validate-config", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    for path in ("pools[0].role", "pools[1].replicas", "pools[1].colour", "routing.threshold_tokens"):
        assert path in err


def test_validate_config_console_script(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CROSS_ERRORS)
    exe = Path(sys.executable).with_name("tandem")
    out = subprocess.run([str(exe), "validate-config", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "12 problem(s)" in out.stderr and "routing.tiers[0].pool (line 5)" in out.stderr


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    yield path


JUNK = [None, -1, 0, 1e309, "", "???", [], {}, [1, 2], {"x": 1}, True]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_mutation_gives_a_config_or_a_config_error(data):
    """Fuzz: replace any node of a shipped file by junk; the loader never fails any other way."""
    import copy

    import yaml

    src = yaml.safe_load((ROOT / "cluster_configs/serving/power-capped.yaml").read_text())
    doc = copy.deepcopy(src)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _leaves(doc) if p]
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(JUNK)))
    try:
        cfg = parse_config(doc, "fuzz")
    except ConfigError as err:
        assert err.problems and all(p.path and p.message for p in err.problems)
    else:
        assert cfg.pools


MIXED = """\
model: {name: tiny, max_model_len: 512}
pools:
  - {name: p, role: prefill, hardware: h100-sxx}
  - {name: d, role: decode, hardware: cpu, replicas: -2}
sla: {default: gold, classes: [{name: std, ttft_ms: 100, tpot_ms: 10}]}
frontend: {port: -1}
kv_transport: {auth_token_env: X, auth_token: y}
"""


def test_field_and_cross_section_errors_are_listed_in_one_run():
    with pytest.raises(ConfigError) as ei:
        load_config_text(MIXED, "mixed.yaml")
    got = {(p.path, p.line) for p in ei.value.problems}
    assert got == {
        ("pools[1].replicas", 4),  # field errors
        ("frontend.port", 6),
        ("pools[0].hardware", 3),  # cross-section, judged on the sections that validated
        ("sla.default", 5),
        ("kv_transport.auth_token", 7),
    }
