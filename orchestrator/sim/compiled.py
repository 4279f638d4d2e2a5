"""Opt-in compiled simulator: the core's and the simulator's hot modules compiled with mypyc.

`make sim-compiled` (`scripts/build_sim_compiled.py`) compiles the modules of `COMPILED` from their
very source files into `build/sim-compiled/` (ignored by git) and writes `manifest.json` there last:
the SHA-256 of every input it was built from (the compiled modules and every `orchestrator` module
they import, directly or not, whose types mypyc read) and the extension file of each compiled
module. Nothing is written next to the sources, so an edited `.py` is never shadowed by a stale `.so`.

`enable()` — called by `tandem simulate --compiled`, `tandem plan --compiled` and
`scripts/bench_sim.py --compiled`, or by them when `TANDEM_SIM_COMPILED=1` — installs an import hook
that maps those module names to the extensions, but only when every input's hash matches the
manifest, the build is for this Python, and none of the modules is imported yet; otherwise it warns
once (`RuntimeWarning`) and pure Python is used. It must run before the first of them is imported.
Pure Python stays the default everywhere: nothing else calls `enable()`. The compiled modules give
the same decisions and results (tests/unit/sim/test_compiled.py compares outcome digests).
"""

from __future__ import annotations

import ast
import enum
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ENV_VAR = "TANDEM_SIM_COMPILED"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
GROUP = "tandem_sim"  # mypyc's group name: its shared library is the top-level module `tandem_sim__mypyc`
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds `orchestrator/`
BUILD_DIR_ENV = "TANDEM_SIM_COMPILED_DIR"
DEFAULT_BUILD_DIR = Path(os.environ.get(BUILD_DIR_ENV) or PACKAGE_ROOT / "build" / "sim-compiled")
"""Where the build lives: build/sim-compiled, or the folder named by TANDEM_SIM_COMPILED_DIR."""

COMPILED: tuple[str, ...] = (
    "orchestrator.core.snapshot",
    "orchestrator.core.cost_model",
    "orchestrator.core.estimates",
    "orchestrator.core.fleet_index",
    "orchestrator.core.power",
    "orchestrator.core.router",
    "orchestrator.core.policies",
    "orchestrator.core.admission",
    "orchestrator.sim.events",
    "orchestrator.sim.fleet",
    "orchestrator.sim.workload",
    "orchestrator.sim.simulator",
    "orchestrator.sim.bridge",
    "orchestrator.sim.costs",
    "orchestrator.sim.report",
)
"""The modules compiled: the simulator's hot path (measured with perf and py-spy; see the Speed section
of orchestrator/sim/README.md). Not `orchestrator.core.hardware`: it finds the catalog next to its file."""


class CompiledState(enum.Enum):
    """What `enable()` found."""

    COMPILED = "compiled"  # the import hook is installed: the modules load from the build
    NOT_REQUESTED = "not_requested"  # (status of a run that did not ask for compiled modules)
    NOT_BUILT = "not_built"  # no manifest: run `make sim-compiled`
    STALE = "stale"  # a source changed since the build (or a file of it is missing)
    INCOMPATIBLE = "incompatible"  # built for another Python or manifest format
    ALREADY_IMPORTED = "already_imported"  # a module of COMPILED was imported (pure) before enable()


@dataclass(frozen=True)
class CompiledStatus:
    """The outcome of `enable()`: `state`, and a sentence saying why (for warnings and reports)."""

    state: CompiledState
    detail: str

    @property
    def compiled(self) -> bool:
        return self.state is CompiledState.COMPILED


_status: CompiledStatus | None = None  # what the first enable() of this process found


def requested(flag: bool = False) -> bool:
    """True when the caller's `--compiled` flag is set or `TANDEM_SIM_COMPILED` is 1/true/yes."""
    return flag or os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_of(module: str, root: Path = PACKAGE_ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def _imports(path: Path) -> set[str]:
    """The `orchestrator.*` modules a source file imports anywhere (functions and TYPE_CHECKING blocks
    included: mypyc reads their types), as dotted names; `from pkg import name` counts pkg.name too."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m == "orchestrator" or m.startswith("orchestrator.")}


def input_files(root: Path = PACKAGE_ROOT) -> list[Path]:
    """Every input of the build, sorted: the sources of COMPILED and of every `orchestrator` module
    they import, directly or not, with the packages' `__init__.py` files (what mypyc type-checks)."""
    found: set[Path] = set()
    todo = list(COMPILED)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way, then the module itself
            base = root.joinpath(*parts[:i])
            for f in (base / "__init__.py", base.with_suffix(".py")):
                if f.is_file() and f not in found:
                    found.add(f)
                    todo.extend(_imports(f))
    return sorted(found)


def extension_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or importlib.machinery.EXTENSION_SUFFIXES[0]


def check(build_dir: Path | str = DEFAULT_BUILD_DIR,
          root: Path = PACKAGE_ROOT) -> tuple[CompiledStatus, dict[str, Path]]:
    """Validate the build against the sources under `root`: (status, module name → extension path).
    The map is empty unless the status is COMPILED. Reads files only; imports nothing."""
    build_dir = Path(build_dir)
    manifest_path = build_dir / MANIFEST
    if not manifest_path.is_file():
        return CompiledStatus(CompiledState.NOT_BUILT, f"no {manifest_path}: run `make sim-compiled`"), {}
    try:
        manifest = json.loads(manifest_path.read_text())
        fmt, suffix = manifest["format"], manifest["ext_suffix"]
        inputs: dict[str, str] = manifest["inputs"]
        extensions: dict[str, str] = manifest["extensions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return CompiledStatus(CompiledState.INCOMPATIBLE, f"unreadable {manifest_path}: {e}"), {}
    if fmt != MANIFEST_FORMAT or suffix != extension_suffix():
        return CompiledStatus(CompiledState.INCOMPATIBLE,
                              f"built as format {fmt} for {suffix}; this Python needs format "
                              f"{MANIFEST_FORMAT} and {extension_suffix()}: run `make sim-compiled`"), {}
    now = {str(p.relative_to(root)): p for p in input_files(root)}
    if set(now) != set(inputs):
        added, gone = sorted(set(now) - set(inputs)), sorted(set(inputs) - set(now))
        return CompiledStatus(CompiledState.STALE,
                              f"sources added {added} / removed {gone} since the build: run `make sim-compiled`"), {}
    changed = [rel for rel, p in now.items() if sha256_of(p) != inputs[rel]]
    if changed:
        return CompiledStatus(CompiledState.STALE,
                              f"{', '.join(changed)} changed since the build: run `make sim-compiled`"), {}
    wanted = set(COMPILED) | {f"{GROUP}__mypyc"}
    if set(extensions) != wanted:
        return CompiledStatus(CompiledState.STALE,
                              f"the build compiled {sorted(extensions)}, not {sorted(wanted)}: run `make sim-compiled`"), {}
    paths = {name: build_dir / rel for name, rel in extensions.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        return CompiledStatus(CompiledState.STALE, f"missing {', '.join(missing)}: run `make sim-compiled`"), {}
    return CompiledStatus(CompiledState.COMPILED, f"{len(COMPILED)} modules from {build_dir}"), paths


class _Finder(importlib.abc.MetaPathFinder):
    """Maps the compiled module names (and mypyc's shared library) to their extension files."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        so = self.paths.get(fullname)
        if so is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


def enable(build_dir: Path | str | None = None, *, root: Path = PACKAGE_ROOT, warn: bool = True) -> CompiledStatus:
    """Load the modules of COMPILED from the build from now on, if it is valid (see the module);
    otherwise warn once and leave pure Python. Idempotent: later calls return the first status."""
    global _status
    if _status is not None:
        return _status
    loaded = [m for m in COMPILED if m in sys.modules]
    if loaded:
        status = CompiledStatus(CompiledState.ALREADY_IMPORTED,
                                f"{', '.join(loaded)} already imported (pure Python); enable() must come first")
    else:
        status, paths = check(build_dir or DEFAULT_BUILD_DIR, root)
        if status.compiled:
            sys.meta_path.insert(0, _Finder(paths))
    if not status.compiled and warn:
        warnings.warn(f"compiled simulator not used ({status.state.value}: {status.detail}); running pure Python",
                      RuntimeWarning, stacklevel=2)
    _status = status
    return status


def status() -> CompiledStatus:
    """What this process runs: COMPILED only if `enable()` installed the hook and the modules loaded
    from it (NOT_REQUESTED when nobody called `enable()`)."""
    if _status is None:
        return CompiledStatus(CompiledState.NOT_REQUESTED, "pure Python (compiled modules not requested)")
    return _status


def is_compiled(module: ModuleType) -> bool:
    """True when `module` was loaded from an extension (a compiled module), not from its `.py`."""
    spec = module.__spec__
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


def loaded_compiled() -> list[str]:
    """The modules of COMPILED imported in this process from their extensions (compiled)."""
    return [m for m in COMPILED if m in sys.modules and is_compiled(sys.modules[m])]
