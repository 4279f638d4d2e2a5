"""cluster_configs/ray/: every `ray up` YAML validates against the schema inside the installed `ray`
package, every key is commented, node types can host the shipped serving configs' pools, and the
on-prem start wrapper declares the right role resources."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
RAY_DIR = ROOT / "cluster_configs" / "ray"
SERVING = ROOT / "cluster_configs" / "serving"
YAMLS = sorted(RAY_DIR.glob("*.yaml"))


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_three_clusters_ship():
    assert {p.name for p in YAMLS} >= {"aws.yaml", "gcp.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_validates_against_rays_schema(path):
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc, _schema())


def test_schema_check_can_fail():
    doc = yaml.safe_load((RAY_DIR / "aws.yaml").read_text())
    doc["available_node_types"]["head"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _schema())


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_key_is_commented(path):
    uncommented = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if re.match(r"^(- )?[\w\-\"~./:]+:( |$)", s) and "#" not in line:
            uncommented.append(f"{path.name}:{n}: {s}")
    assert uncommented == []


def _hosts(ray_yaml: str, serving_yaml: str) -> dict[str, list[str]]:
    """For each pool of the serving YAML, the node types of the Ray YAML that can host a replica."""
    nodes = yaml.safe_load((RAY_DIR / ray_yaml).read_text())["available_node_types"]
    pools = yaml.safe_load((SERVING / serving_yaml).read_text())["pools"]
    out = {}
    for pool in pools:
        pl = pool["placement"]
        need = dict(pl.get("resources") or {})
        if pl.get("num_gpus"):
            need["GPU"] = pl["num_gpus"]
        need["CPU"] = pl.get("num_cpus", 1)
        if pl.get("accelerator_type"):
            need[f"accelerator_type:{pl['accelerator_type']}"] = 0.001
        out[pool["name"]] = [name for name, nt in nodes.items()
                             if all(nt["resources"].get(k, 0) >= v for k, v in need.items())]
    return out


@pytest.mark.parametrize(("ray_yaml", "serving_yaml"), [
    ("aws.yaml", "h100-prefill-l4-decode.yaml"),
    ("aws.yaml", "h100-prefill-gaudi2-decode.yaml"),
    ("gcp.yaml", "h100-prefill-l4-decode.yaml"),
])
def test_node_types_host_each_pool_on_its_role(ray_yaml, serving_yaml):
    hosts = _hosts(ray_yaml, serving_yaml)
    for pool, names in hosts.items():
        assert names, f"no node type of {ray_yaml} can host pool {pool} of {serving_yaml}"
        role = "prefill" if "prefill" in pool else "decode"
        assert all(role in n for n in names), f"pool {pool} could land on {names}"


def _fake_bin(tmp_path: Path, name: str, body: str) -> None:
    p = tmp_path / name
    p.write_text("#!/usr/bin/env bash\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(("ip", "gpus", "hpus", "expect"), [
    ("10.0.0.11", 8, 0, '{"prefill_node": 8, "accelerator_type:H100": 1}'),
    ("10.0.0.12", 0, 8, '{"decode_node": 8, "HPU": 8, "accelerator_type:Intel-GAUDI": 1}'),
    ("10.0.0.13", 4, 0, '{"decode_node": 4, "accelerator_type:L4": 1}'),
])
def test_onprem_wrapper_declares_role_resources(tmp_path, ip, gpus, hpus, expect):
    _fake_bin(tmp_path, "hostname", f'[ "$1" = -I ] && echo "{ip} " || echo host-{ip}')
    if gpus:
        _fake_bin(tmp_path, "nvidia-smi", f'for i in $(seq 0 {gpus - 1}); do echo "GPU $i: fake (UUID: x)"; done')
    if hpus:
        _fake_bin(tmp_path, "hl-smi", f'for i in $(seq 0 {hpus - 1}); do echo "Module ID : $i"; done')
    _fake_bin(tmp_path, "ray", 'echo "RAY $*"')
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(RAY_DIR / "onprem-node-start.sh"), "--address", "10.0.0.10:6379",
                          str(RAY_DIR / "onprem-roles.txt")], env=env, capture_output=True, text=True, check=True)
    assert f"RAY start --address=10.0.0.10:6379 --resources={expect}" in out.stdout


def test_onprem_wrapper_refuses_unknown_host(tmp_path):
    _fake_bin(tmp_path, "hostname", 'echo "192.168.9.9 "')
    _fake_bin(tmp_path, "ray", 'echo "RAY $*"')
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    r = subprocess.run(["bash", str(RAY_DIR / "onprem-node-start.sh"), "--head", str(RAY_DIR / "onprem-roles.txt")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "is listed" in r.stderr and "RAY" not in r.stdout
