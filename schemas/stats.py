"""Windowed stats record (DESIGN §2): Kafka `usage.stats`, ClickHouse `usage_stats`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class StatsRecord(msgspec.Struct, kw_only=True, frozen=True):
    """One closed tumbling window of one (user_id, service)."""

    user_id: str
    service: str
    window_start: datetime
    window_end: datetime
    window_seconds: Annotated[int, msgspec.Meta(ge=1)]
    requests: Count
    successes: Count
    client_errors: Count
    server_errors: Count
    success_rate: Fraction
    error_rate: Fraction
    server_error_rate: Fraction
    latency_avg_ms: NonNeg
    latency_p50_ms: NonNeg
    latency_p95_ms: NonNeg
    latency_p99_ms: NonNeg
    latency_max_ms: NonNeg
    tokens_in: Count
    tokens_out: Count
    cost_usd: NonNeg
    schema_version: int = 1
    # The window's latencies, mergeable (core/sketch.py): their exact sum, and the sketch's
    # bins (ascending) with their counts. A range's percentiles merge these bins.
    latency_sum_ms: NonNeg = 0.0
    latency_bins: list[int] = msgspec.field(default_factory=list)
    latency_bin_counts: list[int] = msgspec.field(default_factory=list)
