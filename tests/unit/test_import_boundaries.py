"""`orchestrator.core`, `orchestrator.config` and `orchestrator.sim` import without torch, ray or grpc."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "ray", "grpc", "vllm", "triton")


def _modules(package: str) -> list[str]:
    path = ROOT.joinpath(*package.split("."))
    names = [package]
    for info in pkgutil.walk_packages([str(path)], prefix=package + "."):
        names.append(info.name)
    return names


@pytest.mark.parametrize("package", ["orchestrator.core", "orchestrator.config", "orchestrator.sim"])
def test_pure_packages_import_no_heavy_backend(package):
    mods = _modules(package)
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} pulled in: {out.stdout.strip()}"


def test_kv_pb_only_touched_by_kv_transfer():
    offenders = []
    for py in ROOT.joinpath("orchestrator").rglob("*.py"):
        if "_pb" in py.read_text():
            offenders.append(str(py))
    for py in ROOT.joinpath("workers").rglob("*.py"):
        if "kv_transfer" not in py.parts and "kv_transfer._pb" in py.read_text():
            offenders.append(str(py))
    assert offenders == []
