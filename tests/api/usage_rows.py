"""Usage rows for API tests: events, and the 10 s stats and 1 m/1 h/1 d rollups derived from
exactly those events, inserted with one insert per table.

The stats and rollups are what the pipeline and the rollup job would write for these events
(counts, sums, the latency sketch of core.sketch), so whichever table a query reads, its
figures agree with the raw events.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

from core import sketch

WINDOW_MS = 10_000
ROLLUPS = (("usage_rollup_1m", 60_000), ("usage_rollup_1h", 3_600_000),
           ("usage_rollup_1d", 86_400_000))
TABLES = ("usage_events", "usage_stats", *(table for table, _ in ROLLUPS))


@dataclass(frozen=True)
class Event:
    event_id: str
    ts_ms: int
    user_id: str
    api_key_id: str
    service: str
    status_code: int
    latency_ms: float
    endpoint: str
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _figures(events: list[Event]) -> list[object]:
    """requests, successes, client_errors, server_errors, latency_sum_ms, latency_max_ms,
    latency_bins, latency_bin_counts, tokens_in, tokens_out, cost_usd."""
    latencies = sorted(event.latency_ms for event in events)
    keys, counts = sketch.bins_of_sorted(latencies)
    return [len(events), sum(e.status_code < 400 for e in events),
            sum(400 <= e.status_code < 500 for e in events),
            sum(e.status_code >= 500 for e in events), sum(latencies), latencies[-1],
            keys, counts, sum(e.tokens_in for e in events), sum(e.tokens_out for e in events),
            sum(e.cost_usd for e in events)]


FIGURES = ["requests", "successes", "client_errors", "server_errors", "latency_sum_ms",
           "latency_max_ms", "latency_bins", "latency_bin_counts", "tokens_in", "tokens_out",
           "cost_usd"]


def seed(client: Client, database: str, events: list[Event]) -> None:
    """Insert `events` and their stats and rollups (nothing when `events` is empty)."""
    if not events:
        return
    now = datetime.now(tz=UTC)
    client.insert("usage_events", [
        [e.event_id, _at(e.ts_ms), e.user_id, e.api_key_id, e.service, e.status_code,
         e.latency_ms, e.endpoint, "POST", e.tokens_in, e.tokens_out, e.cost_usd, now]
        for e in events
    ], column_names=["event_id", "ts", "user_id", "api_key_id", "service", "status_code",
                     "latency_ms", "endpoint", "method", "tokens_in", "tokens_out", "cost_usd",
                     "ingested_at"], database=database)
    windows: dict[tuple[str, str, int], list[Event]] = defaultdict(list)
    for event in events:
        windows[event.user_id, event.service, event.ts_ms // WINDOW_MS * WINDOW_MS].append(event)
    client.insert("usage_stats", [
        [user, service, _at(start), _at(start + WINDOW_MS), WINDOW_MS // 1000,
         *_figures(found)]
        for (user, service, start), found in windows.items()
    ], column_names=["user_id", "service", "window_start", "window_end", "window_seconds",
                     *FIGURES], database=database)
    for table, step in ROLLUPS:
        buckets: dict[tuple[str, str, int], list[tuple[int, list[Event]]]] = defaultdict(list)
        for (user, service, start), found in windows.items():
            buckets[user, service, start // step * step].append((start, found))
        client.insert(table, [
            [user, service, _at(start), len(found),
             *_figures([event for _, window in found for event in window])]
            for (user, service, start), found in buckets.items()
        ], column_names=["user_id", "service", "bucket_start", "windows", *FIGURES],
            database=database)


def clear(client: Client, database: str) -> None:
    for table in TABLES:
        client.command(f"TRUNCATE TABLE {database}.{table}")
