"""`tandem serve --config FILE [--host H] [--port P] [--ray-address ADDR]`: serve a cluster spec.

Without --ray-address a private Ray starts on loopback (the local configs); on a `ray up` cluster
pass `--ray-address auto`. Ctrl-C (or SIGTERM) drains in-flight requests, then stops everything.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="serving YAML (cluster_configs/serving/...)")
    parser.add_argument("--host", default=None, help="listen address (default: frontend.host of the config)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default: frontend.port; 0 = any)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (e.g. 'auto'); default: start a private one on 127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the private Ray (default 8)")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0, help="graceful shutdown wait, s")


def run(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, load_config
    from orchestrator.core.types import TandemError
    from orchestrator.runtime.ray_local import init_local_ray
    from orchestrator.runtime.service import Service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    import ray

    init_local_ray(num_cpus=args.num_cpus, address=args.ray_address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        svc = Service(config, name="serve", host=args.host, port=args.port).start()
    except TandemError as e:
        print(f"tandem serve: {e}", file=sys.stderr)
        ray.shutdown()
        return 1
    print(f"Tandem serving {config.served_model_name!r} at {svc.base_url}/v1 "
          f"({', '.join(f'{p.name}:{p.role.value}x{p.replicas}' for p in config.pools)}); Ctrl-C to stop",
          flush=True)
    stop.wait()
    cancelled = svc.stop(args.drain_timeout_s)
    print(f"stopped ({cancelled} in-flight request(s) cancelled)", flush=True)
    ray.shutdown()
    return 0
