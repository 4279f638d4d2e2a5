"""One Ray session for all integration tests, and the two shipped local deployments served over HTTP.

`services` starts local-cpu.yaml (disaggregated: prefill + decode, KV over gRPC) and
local-cpu-colocated.yaml (two colocated workers) side by side on loopback ports, once per session.
Its teardown fails the run if any worker still holds a KV block.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[2]
SERVING = ROOT / "cluster_configs" / "serving"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from orchestrator.runtime.ray_local import init_local_ray

    init_local_ray(num_cpus=16)
    yield ray
    ray.shutdown()


def start_services(configs: dict):
    """Start Service objects in parallel threads; raise the first failure (after stopping the rest)."""
    from orchestrator.runtime.service import Service

    out: dict = {}
    errors: list[BaseException] = []

    def start(name, cfg):
        try:
            out[name] = Service(cfg, name=name, port=0).start()
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=item) for item in configs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in out.values():
            s.stop(5)
        raise errors[0]
    return out


@pytest.fixture(scope="session")
def services(ray_session):
    from orchestrator.config import load_config

    svcs = start_services({"disagg": load_config(SERVING / "local-cpu.yaml"),
                           "coloc": load_config(SERVING / "local-cpu-colocated.yaml")})
    yield svcs
    leaks = {name: s.check_leaks() for name, s in svcs.items()}
    for s in svcs.values():
        s.stop(10)
    assert not any(leaks.values()), f"KV leaked at the end of the session: {leaks}"


@pytest.fixture(scope="session")
def disagg(services):
    return services["disagg"]


@pytest.fixture(scope="session")
def coloc(services):
    return services["coloc"]


def wait_no_leaks(svc, timeout_s: float = 10.0) -> list[str]:
    """Poll the workers until nothing is held (cancellation is asynchronous) or the timeout passes."""
    import time

    deadline = time.monotonic() + timeout_s
    leaks = svc.check_leaks()
    while leaks and time.monotonic() < deadline:
        time.sleep(0.1)
        leaks = svc.check_leaks()
    return leaks
