"""A tiny run of `tandem bench kv-transfer` (the real benchmark is a script, never a timed test)."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main


@pytest.mark.slow
def test_bench_cli_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    rc = main(["bench", "kv-transfer", "--model-shape", "tiny", "--tokens", "64", "--kv-dtype", "bf16,fp8_e4m3",
               "--repeat", "1", "--layer-compute-ms", "1", "--transport", "data,grpc", "--stripes", "1,2",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "KV GB/s" in printed and "fp8_e4m3 moves" in printed
    result = json.loads(out.read_text())
    assert {"device", "date", "versions", "rows"} <= set(result)
    assert sorted((r["kv_dtype"], r["transport"]) for r in result["rows"]) == [
        (d, t) for d in ("bf16", "fp8_e4m3") for t in ("data/1", "data/2", "grpc")]
    rows = {r["kv_dtype"]: r for r in result["rows"] if r["transport"] == "data/2"}
    # tiny: 2 layers x 2 KV heads x 16 dims; bf16 = 2 B/elem, fp8 = 1 B/elem + 4 B scale per (token, head)
    assert rows["bf16"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert rows["fp8_e4m3"]["bytes_per_token"] == 2 * 2 * 2 * (16 + 4)
    for r in rows.values():
        assert r["kv_gbps"] > 0 and r["raw_tcp_gbps"] > 0 and 0 <= r["hidden_fraction"] <= 1
        assert r["kv_over_raw"] > 0 and r["kv_over_raw_paired"] > 0
        assert r["bare_grpc_gbps"] > 0 and r["frame_gbps"] > 0 and r["receive_gbps"] > 0
        assert r["receive_no_value_checks_gbps"] > 0
        for kind in ("kv", "bare_grpc", "raw_tcp"):
            assert r[f"{kind}_sender_cpu_s_per_gb"] >= 0 and r[f"{kind}_receiver_cpu_s_per_gb"] >= 0
    assert result["versions"]["checksum"].startswith("crc32c via ")
    assert "bare gRPC" in printed and "framing" in printed and "cpu s/GB" in printed


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "kv-transfer", "--kv-dtype", "fp4"]) == 2
    assert "fp4" in capsys.readouterr().err
    assert main(["bench", "kv-transfer", "--transport", "carrier-pigeon"]) == 2
    assert "carrier-pigeon" in capsys.readouterr().err
    assert main(["bench", "kv-transfer", "--stripes", "17"]) == 2
