"""Load a serving YAML into a frozen `TandemConfig`, or raise `ConfigError` listing every problem.

Problems carry their path in the file (`pools[1].role`) and, when the YAML node can be found, its
line number (1-based). Field errors come from pydantic; cross-section errors from `checks`, judged on
every section that validated on its own (so one run lists both kinds).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.config.checks import Problem, check_parts, cross_check, parts_from_data
from orchestrator.config.models import RoutingKind, TandemConfig
from orchestrator.core.types import TandemError


class ConfigError(TandemError, ValueError):
    """A serving config is invalid. `problems` lists every one; str() prints them one per line."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = tuple(problems)
        lines = [f"{source}: {len(self.problems)} problem(s)"] + [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def _path_str(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _parse_path(path: str) -> list[int | str]:
    """Inverse of _path_str for the simple paths we produce: `a.b[2].c` → ['a', 'b', 2, 'c']."""
    parts: list[int | str] = []
    for dotted in path.split("."):
        name, *idx = dotted.split("[")
        if name:
            parts.append(name)
        for i in idx:
            try:
                parts.append(int(i.rstrip("]")))
            except ValueError:
                parts.append(i.rstrip("]"))
    return parts


def _line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """Line (1-based) of the deepest YAML node along loc that exists."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _pydantic_problems(err: ValidationError, root: yaml.Node | None) -> list[Problem]:
    out = []
    errors = err.errors(include_url=False)
    locs = [_strip_tags(e["loc"]) for e in errors]
    for e, loc_t in zip(errors, locs, strict=True):
        loc = list(loc_t)
        # a sequence whose items failed also reports itself as too short: the item errors say it all
        if e["type"] == "too_short" and any(len(o) > len(loc_t) and o[: len(loc_t)] == loc_t for o in locs):
            continue
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        out.append(Problem(_path_str(loc), msg, _line_of(root, loc)))
    return out


_UNION_TAGS = {k.value for k in RoutingKind}


def _strip_tags(loc: Sequence[int | str]) -> tuple[int | str, ...]:
    """Drop the discriminated-union tag pydantic inserts after `routing` (not a key in the file)."""
    out: list[int | str] = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "routing" and part in _UNION_TAGS:
            continue
        out.append(part)
    return tuple(out)


def parse_config(data: Any, source: str = "<config>", root: yaml.Node | None = None) -> TandemConfig:
    """Validate already-parsed YAML data. Raises ConfigError with every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("<root>", "the file must hold a mapping (model:, pools:, ...)")])
    try:
        cfg = TandemConfig.model_validate(data)
    except ValidationError as err:
        # field errors, plus every cross-section problem the sections that did validate let us judge
        field_problems = _pydantic_problems(err, root)
        cross = check_parts(parts_from_data(data))
        raise ConfigError(source, field_problems + _locate(cross, root)) from None
    problems = cross_check(cfg)
    if problems:
        raise ConfigError(source, _locate(problems, root))
    return cfg


def _locate(problems: Sequence[Problem], root: yaml.Node | None) -> list[Problem]:
    return [Problem(p.path, p.message, _line_of(root, _parse_path(p.path))) for p in problems]


def load_config_text(text: str, source: str = "<string>") -> TandemConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [Problem("<yaml>", f"not valid YAML: {err}", line)]) from None
    return parse_config(data, source, root)


def load_config(path: str | Path) -> TandemConfig:
    """Read and validate a serving YAML. Raises ConfigError (every problem, with paths and lines)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(str(p), [Problem("<file>", f"cannot read: {err.strerror or err}")]) from None
    return load_config_text(text, str(p))
