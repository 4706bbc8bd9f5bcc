"""Decode-and-validate throughput of usage events on one core (issue 2's benchmark).

    .venv/bin/python bench/decode.py [--events 200000] [--repeat 3]

(a) `schemas.events.decode_event`: msgspec decodes and validates in one pass, in C.
(b) the baseline: `json.loads` plus a hand-written check of every DESIGN §1 rule,
    written to be fast and complete (it agrees with decode_event on accept/reject for
    every valid and malformed event the generator makes; the script checks that).

Both run over the same realistic bytes from `keypulse.traffic`; the best of `--repeat`
runs counts. Target: (a) >= 300,000 events/s and ahead of (b).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keypulse.traffic import TrafficGenerator, generate_bytes
from schemas.events import (
    MAX_EVENT_BYTES,
    MAX_TS_MS,
    MIN_TS_MS,
    InvalidEvent,
    decode_event,
)

TARGET = 300_000

# -- the baseline: json.loads + a hand-written check of every DESIGN §1 rule -------------

_SERVICE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_METHOD = re.compile(r"[A-Za-z]{1,16}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_MIN_TS_S = MIN_TS_MS / 1000
_MAX_TS_S = MAX_TS_MS / 1000


class Rejected(ValueError):
    pass


def _non_finite(token: str) -> float:
    msg = f"{token} is not valid JSON"
    raise Rejected(msg)


def _string(doc: dict[str, Any], field: str, lo: int, hi: int, required: bool) -> None:
    value = doc.get(field)
    if value is None:
        if required:
            msg = f"{field}: required field missing" if field not in doc else f"{field}: null"
            raise Rejected(msg)
        return
    if type(value) is not str:
        msg = f"{field}: expected str"
        raise Rejected(msg)
    if not lo <= len(value) <= hi:
        msg = f"{field}: length must be in [{lo}, {hi}]"
        raise Rejected(msg)


def _count(doc: dict[str, Any], field: str) -> None:
    value = doc.get(field)
    if value is None:
        return
    if type(value) is not int or not 0 <= value <= 2**53:
        msg = f"{field}: expected int in [0, 2**53]"
        raise Rejected(msg)


def baseline_decode(raw: bytes) -> dict[str, Any]:
    """json.loads + every rule of DESIGN §1, as a careful hand-written validator would."""
    if len(raw) > MAX_EVENT_BYTES:
        msg = "event: too large"
        raise Rejected(msg)
    try:
        doc = json.loads(raw, parse_constant=_non_finite)  # UTF-8, syntax, NaN/Infinity
    except (ValueError, RecursionError) as exc:
        msg = f"event: not valid JSON ({exc})"
        raise Rejected(msg) from None
    if type(doc) is not dict:
        msg = "event: expected object"
        raise Rejected(msg)
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):  # json.loads lets lone surrogates in
        json.dumps(doc, ensure_ascii=False).encode()  # UnicodeEncodeError if one is there
    _string(doc, "event_id", 1, 64, True)
    _string(doc, "user_id", 1, 128, True)
    _string(doc, "api_key_id", 1, 128, True)
    service = doc.get("service")
    if type(service) is not str or not _SERVICE.fullmatch(service):
        msg = "service: must match ^[a-z0-9][a-z0-9_.-]{0,63}$"
        raise Rejected(msg)
    status = doc.get("status_code")
    if type(status) is not int or not 100 <= status <= 599:
        msg = "status_code: expected int in [100, 599]"
        raise Rejected(msg)
    latency = doc.get("latency_ms")
    if type(latency) not in (int, float) or not 0 <= latency <= 3_600_000:
        msg = "latency_ms: expected number in [0, 3600000]"
        raise Rejected(msg)
    ts = doc.get("ts")
    if type(ts) is str:
        try:
            parsed = datetime.fromisoformat(ts)
        except ValueError:
            msg = "ts: not an RFC 3339 date-time"
            raise Rejected(msg) from None
        if parsed.tzinfo is None:
            msg = "ts: needs an offset"
            raise Rejected(msg)
        if not _MIN_TS_S <= parsed.timestamp() < _MAX_TS_S:
            msg = "ts: out of range"
            raise Rejected(msg)
        doc["ts"] = parsed
    elif type(ts) in (int, float):
        if not MIN_TS_MS <= ts < MAX_TS_MS:
            msg = "ts: out of range"
            raise Rejected(msg)
    else:
        msg = "ts: expected RFC 3339 string or epoch ms"
        raise Rejected(msg)
    _string(doc, "endpoint", 0, 256, False)
    method = doc.get("method")
    if method is not None and (type(method) is not str or not _METHOD.fullmatch(method)):
        msg = "method: invalid"
        raise Rejected(msg)
    _count(doc, "tokens_in")
    _count(doc, "tokens_out")
    _count(doc, "request_bytes")
    _count(doc, "response_bytes")
    cost = doc.get("cost_usd")
    if cost is not None and (type(cost) not in (int, float) or not 0 <= cost <= 1e12):
        msg = "cost_usd: expected number in [0, 1e12]"
        raise Rejected(msg)
    _string(doc, "error_type", 0, 128, False)
    _string(doc, "region", 0, 64, False)
    _string(doc, "sdk", 0, 64, False)
    version = doc.get("schema_version", 1)
    if type(version) is not int or version != 1:
        msg = "schema_version: unsupported"
        raise Rejected(msg)
    return doc


# -- timing ----------------------------------------------------------------------------------


def _best_rate(fn: Callable[[bytes], object], values: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for raw in values:
            fn(raw)
        best = min(best, time.perf_counter() - start)
    return len(values) / best


def _agreement(n: int) -> tuple[int, int, int]:
    """(events, both accept, both reject) over valid and malformed events; raises on a split."""
    gen = TrafficGenerator(seed=99, users=50, malformed=0.25)
    accepted = rejected = 0
    for _, raw, kind in gen.labeled_events(n, 1_717_243_200_000):
        try:
            decode_event(raw)
            ours = True
        except InvalidEvent:
            ours = False
        try:
            baseline_decode(raw)
            theirs = True
        except (Rejected, UnicodeError):
            theirs = False
        if ours != theirs:
            msg = f"decode_event and the baseline disagree ({kind or 'valid'}): {raw[:200]!r}"
            raise SystemExit(msg)
        accepted += ours
        rejected += not ours
    return n, accepted, rejected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: one)")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else cpus[-1]})
    pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"python {platform.python_version()} on {platform.machine()}, pinned to CPU {pinned}, "
          f"load average {os.getloadavg()[0]:.2f}")

    start = time.perf_counter()
    values = generate_bytes(args.events, seed=1, users=50, now_ms=1_717_243_200_000, step_ms=0.2)
    gen_s = time.perf_counter() - start
    size = sum(map(len, values)) / len(values)
    print(f"generated {len(values):,} realistic events (avg {size:.0f} bytes, ts half epoch-ms "
          f"half RFC 3339) in {gen_s:.2f} s: {len(values) / gen_s:,.0f} events/s")

    n, accepted, rejected = _agreement(20_000)
    print(f"cross-check on {n:,} events (25% malformed): both accept {accepted:,}, "
          f"both reject {rejected:,}, disagree 0")

    ours = _best_rate(decode_event, values, args.repeat)
    theirs = _best_rate(baseline_decode, values, args.repeat)
    print(f"(a) decode_event (msgspec)           {ours:>12,.0f} events/s  "
          f"{1e9 / ours:6.0f} ns/event")
    print(f"(b) json.loads + hand-written check  {theirs:>12,.0f} events/s  "
          f"{1e9 / theirs:6.0f} ns/event")
    print(f"ratio (a)/(b): {ours / theirs:.2f}x   target >= {TARGET:,} events/s: "
          f"{'met' if ours >= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
