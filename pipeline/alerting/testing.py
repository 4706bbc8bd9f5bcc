"""Building `StatsRecord`s for tests of alerting (here and in the dataflow's tests)."""

from __future__ import annotations

from core.clock import from_ms
from schemas.stats import StatsRecord

T0_MS = 1_700_000_000_000
"""A window-aligned instant (2023-11-14 22:13:20 UTC)."""


def make_stats(
    *, user_id: str = "u1", service: str = "openai", window: int = 0,
    window_seconds: int = 10, requests: int = 100, server_errors: int = 0,
    client_errors: int = 0, latency_ms: float = 100.0, tokens_in: int = 0,
    tokens_out: int = 0, cost_usd: float = 0.0, start_ms: int = T0_MS,
) -> StatsRecord:
    """The stats of window number `window` after `start_ms` (all latencies equal)."""
    ws = start_ms + window * window_seconds * 1000
    errors = server_errors + client_errors
    if errors > requests:
        msg = "more errors than requests"
        raise ValueError(msg)
    return StatsRecord(
        user_id=user_id, service=service, window_start=from_ms(ws),
        window_end=from_ms(ws + window_seconds * 1000), window_seconds=window_seconds,
        requests=requests, successes=requests - errors, client_errors=client_errors,
        server_errors=server_errors,
        success_rate=(requests - errors) / requests if requests else 0.0,
        error_rate=errors / requests if requests else 0.0,
        server_error_rate=server_errors / requests if requests else 0.0,
        latency_avg_ms=latency_ms, latency_p50_ms=latency_ms, latency_p95_ms=latency_ms,
        latency_p99_ms=latency_ms, latency_max_ms=latency_ms, tokens_in=tokens_in,
        tokens_out=tokens_out, cost_usd=cost_usd,
    )
