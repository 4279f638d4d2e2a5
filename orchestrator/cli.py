"""`tandem …` entry point. Thin: each subcommand lives in the package that owns it.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Only the module of
the chosen subcommand is imported, so `tandem validate-config` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("workers.engine.cli", "generate text with the native engine on one process"),
    "serve": ("orchestrator.runtime.cli_serve", "serve a Tandem cluster spec over an OpenAI-compatible API"),
    "demo": ("orchestrator.runtime.cli_demo", "local disaggregated demo on loopback, checked against colocated"),
    "validate-config": ("orchestrator.config.cli", "validate a serving YAML and print every problem"),
    "simulate": ("orchestrator.sim.cli_simulate", "simulate a serving config under a workload"),
    "plan": ("orchestrator.sim.cli_plan", "search fleet sizes and hardware mixes for an SLA"),
    "bench": ("workers.kv_transfer.bench", "benchmarks (kv-transfer)"),
}


def _usage() -> str:
    lines = ["usage: tandem COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<16} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`tandem COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tandem: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, desc = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"tandem {name}", description=desc)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
