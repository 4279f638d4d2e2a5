"""The opt-in compiled simulator (orchestrator/sim/compiled.py, `make sim-compiled`).

- the loader refuses a build that does not match the sources (stale, missing, other Python, modules
  already imported) and falls back to pure Python with one warning — checked on fake builds;
- the real build, when present, gives the very same outcome as pure Python: the bench workload's
  digests (every decision, percentile, finish order, power change) and the contract scenarios of all
  four routing policies (a power budget included), each run in a fresh process, pure and compiled.

The second part is skipped when `build/sim-compiled` is absent or stale (`make sim-compiled` builds
it, ~70 s); with TANDEM_REQUIRE_SIM_COMPILED=1 (CI) it fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.sim import compiled
from orchestrator.sim.compiled import CompiledState

ROOT = compiled.PACKAGE_ROOT


def _fake_build(tmp_path: Path, **change: object) -> Path:
    """A build folder whose manifest matches the sources now (extensions: empty files), with `change`
    applied to the manifest."""
    build = tmp_path / "build"
    exts = {}
    for name in [*compiled.COMPILED, f"{compiled.GROUP}__mypyc"]:
        f = build / "lib" / (name.replace(".", "_") + compiled.extension_suffix())
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
        exts[name] = str(f.relative_to(build))
    manifest = {
        "format": compiled.MANIFEST_FORMAT, "ext_suffix": compiled.extension_suffix(), "extensions": exts,
        "inputs": {str(p.relative_to(ROOT)): compiled.sha256_of(p) for p in compiled.input_files(ROOT)},
    }
    manifest.update(change)
    (build / compiled.MANIFEST).write_text(json.dumps(manifest))
    return build


def test_matching_manifest_is_accepted_and_each_mismatch_refused(tmp_path):
    status, paths = compiled.check(_fake_build(tmp_path / "ok"), ROOT)
    assert status.state is CompiledState.COMPILED
    assert set(paths) == {*compiled.COMPILED, f"{compiled.GROUP}__mypyc"}

    assert compiled.check(tmp_path / "nothing", ROOT)[0].state is CompiledState.NOT_BUILT

    inputs = {str(p.relative_to(ROOT)): compiled.sha256_of(p) for p in compiled.input_files(ROOT)}
    router = "orchestrator/core/router.py"
    assert router in inputs and "orchestrator/core/snapshot.py" in inputs  # compiled and read-only inputs
    edited = dict(inputs, **{router: "0" * 64})
    status, paths = compiled.check(_fake_build(tmp_path / "stale", inputs=edited), ROOT)
    assert status.state is CompiledState.STALE and router in status.detail and paths == {}

    fewer = {k: v for k, v in inputs.items() if k != router}
    assert compiled.check(_fake_build(tmp_path / "added", inputs=fewer), ROOT)[0].state is CompiledState.STALE

    build = _fake_build(tmp_path / "gone")
    next((build / "lib").iterdir()).unlink()
    assert compiled.check(build, ROOT)[0].state is CompiledState.STALE

    other = _fake_build(tmp_path / "other", ext_suffix=".cpython-39-x86_64-linux-gnu.so")
    assert compiled.check(other, ROOT)[0].state is CompiledState.INCOMPATIBLE
    assert compiled.check(_fake_build(tmp_path / "fmt", format=0), ROOT)[0].state is CompiledState.INCOMPATIBLE


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_stale_build_falls_back_to_pure_python_with_one_warning(tmp_path):
    inputs = {str(p.relative_to(ROOT)): compiled.sha256_of(p) for p in compiled.input_files(ROOT)}
    build = _fake_build(tmp_path, inputs=dict(inputs, **{"orchestrator/sim/simulator.py": "0" * 64}))
    out = _python(f"""
        import json, warnings
        from orchestrator.sim import compiled
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = compiled.enable({str(build)!r})
            again = compiled.enable({str(build)!r})
        import orchestrator.sim.simulator as s, orchestrator.core.router as r
        print(json.dumps([first.state.value, again is first, len(caught), str(caught[0].message),
                          s.__file__, r.__file__, compiled.loaded_compiled()]))
    """)
    assert out.returncode == 0, out.stderr
    state, same, warned, message, sim_file, router_file, loaded = json.loads(out.stdout)
    assert state == "stale" and same and warned == 1
    assert "orchestrator/sim/simulator.py" in message and "pure Python" in message
    assert sim_file.endswith("simulator.py") and router_file.endswith("router.py") and loaded == []


def test_enable_after_a_pure_import_is_refused(tmp_path):
    out = _python(f"""
        from orchestrator.sim import compiled
        import orchestrator.core.router
        print(compiled.enable({str(_fake_build(tmp_path))!r}, warn=False).state.value)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["already_imported"]


# ---------------------------------------------------------------- the real build, against pure Python

_BUILT = compiled.check()[0]
needs_build = pytest.mark.skipif(
    not _BUILT.compiled and not os.environ.get("TANDEM_REQUIRE_SIM_COMPILED"),
    reason=f"no valid compiled build ({_BUILT.state.value}): run `make sim-compiled`",
)

_SCENARIOS = r"""
import hashlib, json, sys
from orchestrator.sim import compiled
status = compiled.enable() if sys.argv[1] == "compiled" else compiled.status()
from tests.contract.scenarios import POOLS, SCENARIOS
from tests.unit.sim.factories import make_sim, make_spec, poisson

def sha(x):
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()

scenarios = dict(SCENARIOS)
scenarios["tiers"] = dict(pools=POOLS, routing={"kind": "tiers", "tiers": [
    {"min_prompt_tokens": 0, "pool": None}, {"min_prompt_tokens": 900, "pool": "prefill-a100"},
    {"min_prompt_tokens": 3000, "pool": "prefill-h100"}]})
out = {"status": status.state.value}
for name, spec in sorted(scenarios.items()):
    sim = make_sim(make_spec(**spec), record_decisions=True, record_timeline=True)
    sim.recorder.track_ids()
    reqs = poisson(30.0, {"dist": "lognormal", "median": 1200, "sigma": 1.0, "min": 16, "max": 12000},
                   {"dist": "lognormal", "median": 120, "sigma": 0.7, "min": 4, "max": 800}, 1500, seed=3)
    rep = sim.run(reqs)
    out[name] = {"report": sha(rep.to_dict(include_series=True)), "decisions": sha(sim.decision_log),
                 "by_reason": rep.decisions, "finished": sha(list(sim.recorder.finished_ids or [])),
                 "power": sha(sim.fleet_power.timeline), "energy_j": rep.energy_j, "leaks": sim.leak_report()}
out["loaded"] = compiled.loaded_compiled()
print(json.dumps(out))
"""


def _run_scenarios(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", _SCENARIOS, mode], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@needs_build
def test_compiled_policies_decide_and_simulate_exactly_as_pure_python():
    pure, comp = _run_scenarios("pure"), _run_scenarios("compiled")
    assert pure.pop("status") == "not_requested" and pure.pop("loaded") == []
    assert comp.pop("status") == "compiled" and comp.pop("loaded") == list(compiled.COMPILED)
    assert set(pure) == {"context-ttft", "threshold", "power-capped", "tiers"}
    for name in pure:
        assert pure[name]["leaks"] == [] and sum(pure[name]["by_reason"].values()) > 0
    assert comp == pure


def _bench_digest(*flags: str) -> dict:
    p = subprocess.run([sys.executable, "scripts/bench_sim.py", "--requests", "10000", "--digest", *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@needs_build
def test_compiled_bench_workload_has_the_pure_digests():
    pure, comp = _bench_digest(), _bench_digest("--compiled")
    assert (pure.pop("compiled"), pure.pop("compiled_modules")) == (False, 0)
    assert (comp.pop("compiled"), comp.pop("compiled_modules")) == (True, len(compiled.COMPILED))
    assert pure["requests"] == 10000 and pure["leaks"] == []
    assert comp == pure
