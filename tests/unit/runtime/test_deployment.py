"""Deployment planning without starting Ray: actor placement options from the pool config, one worker
spec per replica with the pool's engine overrides, the KV token's sources, and refused combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.config.models import KVTransportKind
from orchestrator.core.types import KVDtype, Role
from orchestrator.runtime.deployment import DeploymentError, actor_options, resolve_auth_token, worker_specs

SERVING = Path(__file__).resolve().parents[3] / "cluster_configs" / "serving"


def test_placement_follows_the_pool():
    cfg = load_config(SERVING / "h100-prefill-gaudi2-decode.yaml")
    pre = next(p for p in cfg.pools if p.role is Role.PREFILL)
    dec = next(p for p in cfg.pools if p.role is Role.DECODE)
    o = actor_options(pre, "x:prefill-0")
    assert o["num_gpus"] == 1 and o["resources"] == {"prefill_node": 1} and o["accelerator_type"] == "H100"
    o = actor_options(dec, None)
    assert o["num_gpus"] == 0 and o["resources"] == {"HPU": 1, "decode_node": 1}
    assert o["accelerator_type"] == "Intel-GAUDI" and "name" not in o


def test_one_spec_per_replica_with_overrides():
    cfg = load_config(SERVING / "local-cpu-colocated.yaml")
    specs = worker_specs(cfg, "token-123456789")
    assert [s.worker_id for s in specs] == ["colocated-0", "colocated-1"]
    assert all(s.role is Role.BOTH and s.engine_kwargs["num_blocks"] == 256 for s in specs)
    assert specs[0].engine_kwargs["kv_dtype"] is KVDtype.FP8_E4M3 and specs[0].kv_kind == "inprocess"
    cfg = load_config(SERVING / "h100-prefill-gaudi2-decode.yaml")
    dec = [s for s in worker_specs(cfg, "token-123456789") if s.role is Role.DECODE]
    assert dec and all(s.engine_kwargs["block_size"] == 128 for s in dec)
    assert dec[0].tls is not None and dec[0].tls["cert_chain_path"]
    assert all(s.kv_port_range == (50100, 50199) for s in dec)  # kv_transport.port_range reaches the workers


def test_disaggregated_needs_grpc():
    cfg = load_config(SERVING / "local-cpu.yaml")
    bad = cfg.model_copy(update={"kv_transport": cfg.kv_transport.model_copy(
        update={"kind": KVTransportKind.INPROCESS})})
    with pytest.raises(DeploymentError, match="must be grpc"):
        worker_specs(bad, "token-123456789")


def test_auth_token_sources(monkeypatch):
    cfg = load_config(SERVING / "local-cpu.yaml")
    monkeypatch.setenv("TANDEM_KV_TOKEN", "from-the-env-123")
    assert resolve_auth_token(cfg) == "from-the-env-123"
    monkeypatch.delenv("TANDEM_KV_TOKEN")
    a, b = resolve_auth_token(cfg), resolve_auth_token(cfg)
    assert a != b and len(a) >= 16  # fresh random tokens, handed by the driver to both ends
    lit = cfg.model_copy(update={"kv_transport": cfg.kv_transport.model_copy(update={"auth_token": "literal-12345"})})
    assert resolve_auth_token(lit) == "literal-12345"
