"""Trace loaders: public LLM-serving traces turned into `SimRequest` streams.

Every loader yields `TraceRecord(arrival_s, prompt_tokens, output_tokens)` in file order, with
arrival times relative to the first record. Formats:

- `azure`  — Azure LLM inference traces 2023 and 2024: CSV `TIMESTAMP,ContextTokens,GeneratedTokens`,
  TIMESTAMP a date-time with up to 7 fractional digits (`2023-11-16 18:15:46.6805900`) or seconds.
- `burstgpt` — BurstGPT CSV: `Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`,
  Timestamp in seconds. Rows with 0 response tokens are failed requests and are skipped unless
  `keep_failed: true`; `model: ChatGPT` keeps one model only.
- `mooncake` — Mooncake JSONL: one object per line, `timestamp` in milliseconds, `input_length`,
  `output_length`, `hash_ids` (prefix-cache block ids; read, not used by the simulator yet).
- `sharegpt` — ShareGPT JSON: a list of `{"conversations": [{"from": "human"|"gpt", "value": …}]}`.
  It has no timestamps and no token counts: arrivals are Poisson at `rate_rps` (seeded), the prompt is
  every turn before the first `gpt` turn and the output is that `gpt` turn, and lengths are
  estimated without a tokenizer by `estimate_tokens` (below).

Options in the workload's `trace:` mapping: `time_scale` (multiplies gaps; 0.5 = twice as fast),
`target_rate_rps` (overrides time_scale: scales the trace to this mean rate), `loop: true`
(replays the file end to end, shifted in time, for long runs), `max_prompt_tokens`.
Malformed input raises `WorkloadError` with the file and line number.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator.sim.workload import SimRequest, WorkloadError


class TraceRecord(NamedTuple):
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def _parse_time_s(text: str, where: str) -> float:
    """Seconds since the epoch (date-time, fractional digits beyond 6 dropped) or a plain number."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    head, _, frac = text.partition(".")
    try:
        base = _dt.datetime.fromisoformat(head.replace("T", " "))
    except ValueError:
        raise WorkloadError(f"{where}: cannot read timestamp {text!r}") from None
    if base.tzinfo is None:
        base = base.replace(tzinfo=_dt.UTC)
    frac_digits = "".join(ch for ch in frac if ch.isdigit())
    frac_s = float("0." + frac_digits) if frac_digits else 0.0
    return base.timestamp() + frac_s


def _int_field(row: dict[str, str], key: str, where: str) -> int:
    try:
        v = int(float(row[key]))
    except KeyError:
        raise WorkloadError(f"{where}: missing column {key!r}") from None
    except (TypeError, ValueError):
        raise WorkloadError(f"{where}: column {key!r} is not a number: {row.get(key)!r}") from None
    if v < 0:
        raise WorkloadError(f"{where}: column {key!r} is negative: {v}")
    return v


def load_azure(path: Path, opts: dict[str, Any]) -> Iterator[TraceRecord]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not need <= cols:
            raise WorkloadError(f"{path}: azure trace needs columns {sorted(need)}, found {sorted(cols)}")
        for i, row in enumerate(reader, start=2):
            where = f"{path}:{i}"
            yield TraceRecord(_parse_time_s(row["TIMESTAMP"], where),
                              _int_field(row, "ContextTokens", where), _int_field(row, "GeneratedTokens", where))


def load_burstgpt(path: Path, opts: dict[str, Any]) -> Iterator[TraceRecord]:
    keep_failed = bool(opts.get("keep_failed", False))
    model = opts.get("model")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        need = {"Timestamp", "Request tokens", "Response tokens"}
        if not need <= cols:
            raise WorkloadError(f"{path}: BurstGPT trace needs columns {sorted(need)}, found {sorted(cols)}")
        for i, row in enumerate(reader, start=2):
            where = f"{path}:{i}"
            if model is not None and row.get("Model") != model:
                continue
            out = _int_field(row, "Response tokens", where)
            if out == 0 and not keep_failed:
                continue
            yield TraceRecord(_parse_time_s(row["Timestamp"], where), _int_field(row, "Request tokens", where), out)


def load_mooncake(path: Path, opts: dict[str, Any]) -> Iterator[TraceRecord]:
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{where}: not JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise WorkloadError(f"{where}: expected an object per line")
            try:
                t_ms = float(obj["timestamp"])
            except (KeyError, TypeError, ValueError):
                raise WorkloadError(f"{where}: needs a numeric 'timestamp' (ms)") from None
            yield TraceRecord(t_ms / 1000.0, _int_field(obj, "input_length", where),
                              _int_field(obj, "output_length", where))


_PIECE = re.compile(r"[A-Za-z]+|[0-9]{1,3}|\s+|[^\sA-Za-z0-9]")


def estimate_tokens(text: str) -> int:
    """Tokenizer-free token estimate, close to BPE tokenizers (Llama 3, GPT-4) on English and code.

    Splits the text into letter runs, runs of up to 3 digits, whitespace runs and single other
    characters. A letter run costs ceil(len / 6) tokens (words of up to 6 letters are one token,
    longer words split every ~6 letters); a digit group, a punctuation mark or a non-ASCII character costs 1; a
    whitespace run costs 1 only when it is not a single space (a single space merges into the next
    word). At least 1 token.
    """
    n = 0
    for m in _PIECE.finditer(text):
        s = m.group()
        c = s[0]
        if c.isalpha() and c.isascii():
            n += (len(s) + 5) // 6
        elif c.isspace():
            if s != " ":
                n += 1
        else:
            n += 1
    return max(1, n)


def load_sharegpt(path: Path, opts: dict[str, Any]) -> Iterator[TraceRecord]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}: not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: ShareGPT JSON must be a list of conversations")
    rate = opts.get("rate_rps", 1.0)
    if not isinstance(rate, int | float) or not rate > 0:
        raise WorkloadError(f"{path}: trace.rate_rps must be > 0 for ShareGPT (it has no timestamps)")
    rng = random.Random(opts.get("seed", 0))
    t = 0.0
    for i, conv in enumerate(data):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            raise WorkloadError(f"{path}: entry {i} has no 'conversations' list")
        prompt_parts: list[str] = []
        reply = None
        for turn in turns:
            if not isinstance(turn, dict) or "value" not in turn:
                raise WorkloadError(f"{path}: entry {i} has a turn without 'value'")
            if turn.get("from") == "gpt":
                reply = str(turn["value"])
                break
            prompt_parts.append(str(turn["value"]))
        if reply is None or not prompt_parts:
            continue  # no prompt→reply pair: nothing to serve
        t += rng.expovariate(float(rate))
        yield TraceRecord(t, estimate_tokens("\n".join(prompt_parts)), estimate_tokens(reply))


LOADERS: dict[str, Callable[[Path, dict[str, Any]], Iterator[TraceRecord]]] = {
    "azure": load_azure,
    "burstgpt": load_burstgpt,
    "mooncake": load_mooncake,
    "sharegpt": load_sharegpt,
}


def read_trace(opts: dict[str, Any], base_dir: Path) -> Iterator[TraceRecord]:
    """Records of one pass over the trace, times relative to the first record, time-scaled."""
    fmt = opts["format"]
    path = Path(opts["path"])
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        raise WorkloadError(f"trace file not found: {path}")
    loader = LOADERS[fmt]
    scale = float(opts.get("time_scale", 1.0))
    target = opts.get("target_rate_rps")
    if target is not None:
        scale = _mean_rate(loader(path, opts)) / float(target)
    if not scale > 0:
        raise WorkloadError(f"trace.time_scale must be > 0, got {scale!r}")
    t0 = None
    last = -math.inf
    for rec in loader(path, opts):
        if t0 is None:
            t0 = rec.arrival_s
        t = (rec.arrival_s - t0) * scale
        if t < last:
            raise WorkloadError(f"{path}: timestamps go backwards ({rec.arrival_s})")
        last = t
        yield TraceRecord(t, rec.prompt_tokens, rec.output_tokens)


def _mean_rate(records: Iterator[TraceRecord], sample: int = 10000) -> float:
    first = last = None
    n = 0
    for rec in records:
        first = rec.arrival_s if first is None else first
        last = rec.arrival_s
        n += 1
        if n >= sample:
            break
    if n < 2 or last == first:
        raise WorkloadError("trace too short to measure its rate (needs 2 records at distinct times)")
    return (n - 1) / (last - first)  # type: ignore[operator]  # (n >= 2: both set)


def trace_requests(opts: dict[str, Any], base_dir: Path, limit: int | None,
                   sla_class: str | None = None) -> Iterator[SimRequest]:
    """SimRequests from a trace: zero-length prompts/outputs are raised to 1 token (one is needed
    to route and to emit); with `loop: true` the trace repeats, each pass after the previous one."""
    loop = bool(opts.get("loop", False))
    max_prompt = int(opts.get("max_prompt_tokens", 1 << 30))
    rid = 0
    offset = 0.0
    while True:
        last = 0.0
        count = 0
        for rec in read_trace(opts, base_dir):
            if limit is not None and rid >= limit:
                return
            yield SimRequest(rid, offset + rec.arrival_s, min(max(1, rec.prompt_tokens), max_prompt),
                             max(1, rec.output_tokens), sla_class)
            rid += 1
            count += 1
            last = rec.arrival_s
        if not loop or count == 0:
            return
        offset += last + (last / (count - 1) if count > 1 else 1.0)  # one mean gap between passes
