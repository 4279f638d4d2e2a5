"""`tandem validate-config FILE…`: print every problem of each serving YAML; exit 1 if any."""

from __future__ import annotations

import argparse
import sys

from orchestrator.config.loader import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="serving YAML(s) to validate")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every file is valid, 1 otherwise (problems on stderr)."""
    status = 0
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as err:
            print(str(err), file=sys.stderr)
            status = 1
            continue
        if not args.quiet:
            pools = ", ".join(f"{p.name}({p.role.value}×{p.replicas} {p.hardware})" for p in cfg.pools)
            print(f"{path}: ok — model {cfg.model.name}, routing {cfg.routing.kind}, pools: {pools}")
    return status
