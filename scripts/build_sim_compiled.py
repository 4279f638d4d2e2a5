"""Compile the simulator's hot modules with mypyc into build/sim-compiled/ (`make sim-compiled`).

    .venv/bin/python scripts/build_sim_compiled.py [--build-dir build/sim-compiled] [--jobs 2]

Compiles the modules of `orchestrator.sim.compiled.COMPILED` from their source files in this tree
(mypyc type-checks them, generates C, gcc builds one extension per module plus mypyc's shared
library `tandem_sim__mypyc`) into `<build-dir>/lib`, then writes `<build-dir>/manifest.json` with
the SHA-256 of every input (see orchestrator/sim/compiled.py). The old manifest is removed first,
so a failed build leaves none; if a source changes while the build runs, no manifest is written.
Needs gcc and the Python headers; mypy (a dev dependency) brings mypyc. Prints the wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.sim import compiled  # noqa: E402  (reads files only: imports no compiled module)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=str(compiled.DEFAULT_BUILD_DIR))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel gcc jobs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    build_dir = Path(args.build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = build_dir / compiled.MANIFEST
    manifest_path.unlink(missing_ok=True)
    inputs = {str(p.relative_to(ROOT)): compiled.sha256_of(p) for p in compiled.input_files(ROOT)}

    from mypyc.build import mypycify
    from setuptools import setup

    os.chdir(ROOT)  # mypy names the modules from the paths (relative to the folder holding orchestrator/)
    sources = [str(compiled.source_of(m, Path("."))) for m in compiled.COMPILED]
    lib, temp = build_dir / "lib", build_dir / "temp"
    extensions = mypycify(sources, opt_level="3", target_dir=str(build_dir / "c"), group_name=compiled.GROUP)
    setup(name="tandem-sim-compiled", ext_modules=extensions, script_args=[
        "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(temp), "--parallel", str(max(1, args.jobs))])

    after = {str(p.relative_to(ROOT)): compiled.sha256_of(p) for p in compiled.input_files(ROOT)}
    if after != inputs:
        changed = sorted(k for k in set(after) | set(inputs) if after.get(k) != inputs.get(k))
        print(f"sources changed during the build ({', '.join(changed)}): no manifest written; build again",
              file=sys.stderr)
        return 1
    suffix = compiled.extension_suffix()
    names = [*compiled.COMPILED, f"{compiled.GROUP}__mypyc"]
    ext_files = {name: lib.joinpath(*name.split(".")).with_name(name.split(".")[-1] + suffix) for name in names}
    missing = [str(p) for p in ext_files.values() if not p.is_file()]
    if missing:
        print(f"the build did not produce {', '.join(missing)}", file=sys.stderr)
        return 1
    import mypy.version

    manifest = {
        "format": compiled.MANIFEST_FORMAT,
        "ext_suffix": suffix,
        "python": sys.version.split()[0],
        "mypy": mypy.version.__version__,
        "built_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "extensions": {name: str(p.relative_to(build_dir)) for name, p in ext_files.items()},
        "inputs": inputs,
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(manifest_path)
    print(f"built {len(compiled.COMPILED)} modules into {lib} in {time.perf_counter() - t0:.1f} s; wrote {manifest_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
