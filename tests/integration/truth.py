"""An independent reference for what the pipeline must compute from a known stream."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

STATS_FIELDS = (
    "requests",
    "successes",
    "client_errors",
    "server_errors",
    "success_rate",
    "error_rate",
    "server_error_rate",
    "latency_avg_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "tokens_in",
    "tokens_out",
    "cost_usd",
)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def expected_windows(
    events: list[dict[str, Any]], window_ms: int
) -> dict[tuple[str, str, int], dict[str, float]]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        groups[(e["user_id"], e["service"], e["ts"] - e["ts"] % window_ms)].append(e)
    out = {}
    for key, evs in groups.items():
        n = len(evs)
        lat = [float(e["latency_ms"]) for e in evs]
        ok = sum(1 for e in evs if e["status_code"] < 400)
        client = sum(1 for e in evs if 400 <= e["status_code"] < 500)
        server = sum(1 for e in evs if e["status_code"] >= 500)
        out[key] = {
            "requests": n,
            "successes": ok,
            "client_errors": client,
            "server_errors": server,
            "success_rate": ok / n,
            "error_rate": (client + server) / n,
            "server_error_rate": server / n,
            "latency_avg_ms": sum(lat) / n,
            "latency_p50_ms": quantile(lat, 0.5),
            "latency_p95_ms": quantile(lat, 0.95),
            "latency_p99_ms": quantile(lat, 0.99),
            "latency_max_ms": max(lat),
            "tokens_in": sum(e.get("tokens_in") or 0 for e in evs),
            "tokens_out": sum(e.get("tokens_out") or 0 for e in evs),
            "cost_usd": sum(e.get("cost_usd") or 0 for e in evs),
        }
    return out


def assert_windows_equal(
    actual: dict[tuple[str, str, int], dict[str, float]],
    expected: dict[tuple[str, str, int], dict[str, float]],
) -> None:
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))[:5]}, "
        f"extra {sorted(set(actual) - set(expected))[:5]}"
    )
    for key, want in expected.items():
        got = actual[key]
        for name in STATS_FIELDS:
            assert math.isclose(got[name], want[name], rel_tol=1e-9, abs_tol=1e-9), (
                key,
                name,
                got[name],
                want[name],
            )
