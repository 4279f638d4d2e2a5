"""Start (or join) Ray for local runs: every listener on 127.0.0.1, a small object store, no dashboard.

shared/NOTES.md: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps Ray on loopback; the default object store
would take ~7 GiB; plain `ray` starts fastest without the dashboard.
"""

from __future__ import annotations

import os

OBJECT_STORE_BYTES = 192 * 1024 * 1024


def init_local_ray(num_cpus: int = 8, address: str | None = None) -> None:
    """Start a private local Ray on loopback (or connect to `address`, e.g. "auto" on a `ray up` cluster).

    num_cpus is logical: actors reserve CPUs from it (the local configs ask 1 per worker)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
             logging_level="WARNING", log_to_driver=True, _node_ip_address="127.0.0.1")
