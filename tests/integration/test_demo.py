"""Acceptance 6: `tandem demo` (the README's main command) runs end to end and reports identical outputs.

Runs the CLI's `run()` in this process on the session's Ray (a fresh `tandem demo` starts its own);
the subprocess form is what `make demo` runs."""

from __future__ import annotations

import argparse
import json

import pytest

from orchestrator.runtime import cli_demo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_reports_identical_outputs_and_kv_over_grpc(ray_session, capsys):
    parser = argparse.ArgumentParser()
    cli_demo.add_arguments(parser)
    code = cli_demo.run(parser.parse_args(["--requests", "6", "--max-tokens", "6", "--json"]))
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["ok"] and report["identical_outputs"] and report["leaks"] == {}
    dis, col = report["deployments"]["disaggregated"], report["deployments"]["colocated"]
    assert dis["kv_bytes_transferred"] > 0 and col["kv_bytes_transferred"] == 0
    assert set(dis["decisions"]["routes"]) == {"at_or_above_threshold", "below_threshold"}
    assert dis["tokens_generated"] == col["tokens_generated"] > 0
    assert dis["ttft_ms"]["p50"] is not None and dis["tpot_ms"]["p50"] is not None
    assert ray_session.is_initialized()  # the demo left the caller's Ray alone


def test_demo_rejects_a_bad_config_path(ray_session, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny}\npools: []\n")
    parser = argparse.ArgumentParser()
    cli_demo.add_arguments(parser)
    assert cli_demo.run(parser.parse_args(["--config", str(bad), "--json"])) == 2
    assert "pools" in capsys.readouterr().err
