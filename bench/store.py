"""A large embedded store for the query benchmark, generated inside ClickHouse.

    python bench/store.py --data-dir DIR [--events 10000000] [--users 1000] [--days 30]

Migrates a fresh chDB store, then writes `--events` raw events of `--users` users over the
last `--days` days straight into `usage_events` (`INSERT ... SELECT FROM numbers(...)`, one
million per insert), computes their 10 s windows into `usage_stats` exactly as the pipeline
would (nearest-rank percentiles, latency sum, the sketch's bins through `core.sketch.SQL_BIN`),
then the 1 m, 1 h and 1 d rollups. Progress goes to stderr; the last line on stdout is a JSON
summary (users by volume, row counts, timings, store size).

Every draw is a hash of the event's number and a seed, so a seed gives the same store. Users
are skewed (user_0000 is the heaviest: the user index is 1000 · u^2.5 for a uniform u); each
makes 1-5 weighted draws from the services of `keypulse.traffic.CATALOGUE`, with 1-3 API keys
per service; endpoints, methods, log-normal latencies, token counts and prices follow that
catalogue's profiles; statuses are mostly 2xx with the services' 4xx and 5xx rates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from core.clickhouse import shared_client
from core.settings import Settings, load
from core.sketch import SQL_BIN
from infra.clickhouse.migrate import migrate
from keypulse.traffic import CATALOGUE

CHUNK = 1_000_000
DAY_S = 86_400
U64 = "18446744073709551616.0"  # 2**64: a hash over it is a uniform draw in [0, 1)

# (status, error_type, weight) as in keypulse.traffic
SUCCESSES = ((200, "", 90), (201, "", 8), (202, "", 2))
CLIENT_ERRORS = ((400, "invalid_request", 25), (401, "authentication_error", 18),
                 (403, "permission_denied", 7), (404, "not_found", 20), (409, "conflict", 3),
                 (422, "validation_error", 7), (429, "rate_limit_exceeded", 20))
SERVER_ERRORS = ((500, "internal_server_error", 45), (502, "bad_gateway", 20),
                 (503, "service_unavailable", 25), (504, "gateway_timeout", 10))
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1")
SDKS = ("keypulse-python/1.8.2", "keypulse-node/3.2.1", "keypulse-go/0.12.0")


def lit(value: object) -> str:
    """A ClickHouse literal for nested lists of numbers and strings."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(lit(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def cumulative(weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(acc / total)
    out[-1] = 1.0000001  # a draw in [0, 1) always finds its slot
    return out


def catalogue_sql() -> str:
    """The catalogue as WITH constants (arrays indexed by service, then endpoint)."""
    services = list(CATALOGUE)
    per_ep: dict[str, list[list[Any]]] = {name: [] for name in (
        "ep_path", "ep_method", "ep_med", "ep_sigma", "ep_tin", "ep_tout", "ep_usd_in",
        "ep_usd_out", "ep_ms_tok", "ep_usd_call", "ep_req", "ep_resp", "ep_err")}
    ep_cum = []
    for s in services:
        ep_cum.append(cumulative([e.weight for e in s.endpoints]))
        per_ep["ep_path"].append([e.path for e in s.endpoints])
        per_ep["ep_method"].append([e.method for e in s.endpoints])
        per_ep["ep_med"].append([float(e.latency_median_ms) for e in s.endpoints])
        per_ep["ep_sigma"].append([float(e.latency_sigma) for e in s.endpoints])
        per_ep["ep_tin"].append([float(e.tokens_in_median) for e in s.endpoints])
        per_ep["ep_tout"].append([float(e.tokens_out_median) for e in s.endpoints])
        per_ep["ep_usd_in"].append([float(e.usd_per_mtok_in) for e in s.endpoints])
        per_ep["ep_usd_out"].append([float(e.usd_per_mtok_out) for e in s.endpoints])
        per_ep["ep_ms_tok"].append([float(e.ms_per_token_out) for e in s.endpoints])
        per_ep["ep_usd_call"].append([float(e.usd_per_call) for e in s.endpoints])
        per_ep["ep_req"].append([float(e.request_bytes[1]) for e in s.endpoints])
        per_ep["ep_resp"].append([float(e.response_bytes[1]) for e in s.endpoints])
        per_ep["ep_err"].append([float(e.error_scale) for e in s.endpoints])
    consts = {
        "svc_name": [s.name for s in services],
        "svc_cum": cumulative([s.weight for s in services]),
        "svc_client": [float(s.client_error_rate) for s in services],
        "svc_server": [float(s.server_error_rate) for s in services],
        "ep_cum": ep_cum,
        **per_ep,
        "ok_code": [c for c, _, _ in SUCCESSES],
        "ok_cum": cumulative([w for _, _, w in SUCCESSES]),
        "ce_code": [c for c, _, _ in CLIENT_ERRORS],
        "ce_type": [t for _, t, _ in CLIENT_ERRORS],
        "ce_cum": cumulative([w for _, _, w in CLIENT_ERRORS]),
        "se_code": [c for c, _, _ in SERVER_ERRORS],
        "se_type": [t for _, t, _ in SERVER_ERRORS],
        "se_cum": cumulative([w for _, _, w in SERVER_ERRORS]),
        "regions": list(REGIONS),
        "sdks": list(SDKS),
    }
    return ",\n".join(f"{lit(v)} AS {k}" for k, v in consts.items())


def events_sql(db: str, *, first: int, count: int, users: int, start_ms: int, span_ms: int,
               seed: int) -> str:
    """One INSERT of events numbered [first, first + count)."""
    def u(k: int) -> str:
        return f"(cityHash64(number, {seed}, {k}) / {U64})"
    return f"""
INSERT INTO {db}.usage_events
SELECT event_id, ts, user_id, api_key_id, service, status_code, latency_ms, endpoint, method,
       tokens_in, tokens_out, cost_usd, request_bytes, response_bytes, error_type, region, sdk,
       1 AS schema_version, false AS late, toUInt16(cityHash64(user_id) % 4) AS kafka_partition,
       number AS kafka_offset, ts + toIntervalMillisecond(150 + number % 400) AS ingested_at
FROM (
    WITH {catalogue_sql()}
    SELECT
        number,
        toUInt32(floor({users} * pow({u(0)}, 2.5))) AS uid,
        concat('user_', leftPad(toString(uid), 4, '0')) AS user_id,
        1 + cityHash64(uid, {seed}, 'nsvc') % 5 AS nsvc,
        toUInt32(floor(nsvc * pow({u(1)}, 1.5))) AS j,
        arrayFirstIndex(c -> c > cityHash64(uid, {seed}, 'svc', j) / {U64}, svc_cum) AS s,
        svc_name[s] AS service,
        1 + cityHash64(uid, s, {seed}, 'nkeys') % 3 AS nkeys,
        concat('key_', lower(hex(cityHash64(uid, s, {seed}, cityHash64(number, {seed}, 2) % nkeys)
            )), '') AS api_key_id,
        arrayFirstIndex(c -> c > {u(3)}, ep_cum[s]) AS e,
        ep_path[s][e] AS endpoint,
        ep_method[s][e] AS method,
        sqrt(-2 * log(greatest({u(4)}, 1e-12))) AS radius,
        radius * cos(2 * pi() * {u(5)}) AS z1,
        radius * sin(2 * pi() * {u(5)}) AS z2,
        sqrt(-2 * log(greatest({u(6)}, 1e-12))) * cos(2 * pi() * {u(7)}) AS z3,
        ep_tin[s][e] > 0 AS llm,
        if(llm, toUInt64(round(ep_tin[s][e] * exp(0.5 * z2))), NULL) AS tokens_in,
        if(llm, toUInt64(round(ep_tout[s][e] * exp(0.5 * z3))), NULL) AS tokens_out,
        round(ep_med[s][e] * exp(ep_sigma[s][e] * z1)
              + ifNull(tokens_out, 0) * ep_ms_tok[s][e], 3) AS latency_ms,
        {u(8)} AS r_status,
        {u(9)} AS r_code,
        svc_server[s] * ep_err[s][e] AS p_server,
        svc_client[s] * ep_err[s][e] AS p_client,
        multiIf(r_status < p_server, 5, r_status < p_server + p_client, 4, 2) AS cls,
        toUInt16(multiIf(cls = 5, se_code[arrayFirstIndex(c -> c > r_code, se_cum)],
                         cls = 4, ce_code[arrayFirstIndex(c -> c > r_code, ce_cum)],
                         ok_code[arrayFirstIndex(c -> c > r_code, ok_cum)])) AS status_code,
        multiIf(cls = 5, se_type[arrayFirstIndex(c -> c > r_code, se_cum)],
                cls = 4, ce_type[arrayFirstIndex(c -> c > r_code, ce_cum)], '') AS error_type,
        multiIf(llm AND cls = 2, (tokens_in * ep_usd_in[s][e] + tokens_out * ep_usd_out[s][e])
                                 / 1e6,
                ep_usd_call[s][e] > 0 AND cls = 2, ep_usd_call[s][e], NULL) AS cost_usd,
        if(ep_req[s][e] > 0, toUInt64(ep_req[s][e] * {u(10)}), NULL) AS request_bytes,
        if(ep_resp[s][e] > 0, toUInt64(ep_resp[s][e] * {u(11)}), NULL) AS response_bytes,
        regions[1 + cityHash64(uid, {seed}, 'region') % length(regions)] AS region,
        sdks[1 + cityHash64(uid, {seed}, 'sdk') % length(sdks)] AS sdk,
        UUIDNumToString(sipHash128(number, {seed})) AS event_id,
        fromUnixTimestamp64Milli(toInt64({start_ms} + floor({u(12)} * {span_ms})), 'UTC') AS ts
    FROM numbers({first}, {count})
)
SETTINGS max_partitions_per_insert_block = 0
"""


STATS_COLUMNS = (
    "user_id, service, window_start, window_end, window_seconds, requests, successes, "
    "client_errors, server_errors, success_rate, error_rate, server_error_rate, latency_avg_ms, "
    "latency_p50_ms, latency_p95_ms, latency_p99_ms, latency_max_ms, tokens_in, tokens_out, "
    "cost_usd, latency_sum_ms, latency_bins, latency_bin_counts"
)


def stats_sql(db: str, users: tuple[str, str]) -> str:
    """The 10 s windows of the events of users `users` (first, last), as the pipeline
    closes them."""
    return f"""
INSERT INTO {db}.usage_stats ({STATS_COLUMNS})
SELECT user_id, service, ws, ws + toIntervalSecond(10), 10, requests, successes,
       client_errors, server_errors, successes / requests, (client_errors + server_errors) /
       requests, server_errors / requests, latency_sum / requests,
       sorted[toUInt64(greatest(1, ceil(0.50 * requests)))],
       sorted[toUInt64(greatest(1, ceil(0.95 * requests)))],
       sorted[toUInt64(greatest(1, ceil(0.99 * requests)))],
       sorted[-1], tokens_in, tokens_out, round(cost, 9), latency_sum, sketch.1, sketch.2
FROM (
    SELECT user_id, service, toStartOfInterval(ts, toIntervalSecond(10)) AS ws,
           count() AS requests, countIf(status_code < 400) AS successes,
           countIf(status_code >= 400 AND status_code < 500) AS client_errors,
           countIf(status_code >= 500) AS server_errors,
           sum(latency_ms) AS latency_sum, arraySort(groupArray(latency_ms)) AS sorted,
           sum(ifNull(tokens_in, 0)) AS tokens_in, sum(ifNull(tokens_out, 0)) AS tokens_out,
           sum(ifNull(cost_usd, 0)) AS cost,
           sumMap([{SQL_BIN}], [toUInt32(1)]) AS sketch
    FROM {db}.usage_events
    WHERE user_id >= {lit(users[0])} AND user_id <= {lit(users[1])}
    GROUP BY user_id, service, ws
)
"""


ROLLUP_COLUMNS = (
    "user_id, service, bucket_start, windows, requests, successes, client_errors, "
    "server_errors, latency_sum_ms, latency_max_ms, latency_bins, latency_bin_counts, "
    "tokens_in, tokens_out, cost_usd"
)


def rollup_sql(db: str, table: str, source: str, bucket: str, users: tuple[str, str]) -> str:
    """The rollup buckets of users `users` (first, last) recomputed from their source read
    FINAL (the 10 s windows, or the finer rollup)."""
    if source == "usage_stats":
        start, windows, where = "window_start", "count()", "window_seconds = 10 AND "
    else:
        start, windows, where = "bucket_start", "sum(windows)", ""
    return f"""
INSERT INTO {db}.{table} ({ROLLUP_COLUMNS})
SELECT user_id, service, b, windows, requests, successes, client_errors, server_errors,
       latency_sum_ms, latency_max_ms, sketch.1, sketch.2, tokens_in, tokens_out, cost_usd
FROM (
    SELECT user_id, service, toDateTime({bucket}({start}), 'UTC') AS b, {windows} AS windows,
           sum(requests) AS requests, sum(successes) AS successes,
           sum(client_errors) AS client_errors, sum(server_errors) AS server_errors,
           sum(latency_sum_ms) AS latency_sum_ms, max(latency_max_ms) AS latency_max_ms,
           sumMap(latency_bins, arrayMap(x -> toUInt64(x), latency_bin_counts)) AS sketch,
           sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out, sum(cost_usd) AS cost_usd
    FROM {db}.{source} FINAL
    WHERE {where}user_id >= {lit(users[0])} AND user_id <= {lit(users[1])}
    GROUP BY user_id, service, b
)
"""


def user_groups(client: Client, db: str) -> list[tuple[str, str]]:
    """(first, last) user ids of consecutive groups of about CHUNK events."""
    groups: list[tuple[str, str]] = []
    first, size = "", 0
    rows = client.query(f"SELECT user_id, count() FROM {db}.usage_events GROUP BY user_id "
                        "ORDER BY user_id").result_rows
    for user_id, n in rows:
        first = first or user_id
        size += n
        if size >= CHUNK:
            groups.append((first, user_id))
            first, size = "", 0
    if first:
        groups.append((first, rows[-1][0]))
    return groups


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def generate(settings: Settings, *, events: int, users: int, days: int, seed: int,
             optimize: bool, now_s: int | None = None,
             say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
             ) -> dict[str, Any]:
    """Fill the store of `settings` (fresh) and describe it."""
    client = shared_client(settings)
    db = settings.clickhouse_database
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    migrate(client, settings, progress=lambda _line: None)
    timings["migrate_s"] = time.perf_counter() - t0

    end_s = (now_s if now_s is not None else int(time.time())) // 60 * 60
    start_s = end_s - days * DAY_S + 3600  # an hour inside the 30-day TTLs
    span_ms = (end_s - start_s) * 1000

    t = time.perf_counter()
    for first in range(0, events, CHUNK):
        count = min(CHUNK, events - first)
        client.command(events_sql(db, first=first, count=count, users=users,
                                  start_ms=start_s * 1000, span_ms=span_ms, seed=seed))
        done = first + count
        say(f"events   {done:>12,} / {events:,}  {done / (time.perf_counter() - t):,.0f}/s")
    timings["events_s"] = time.perf_counter() - t

    # Users in groups of about CHUNK events: `user_id` leads every ORDER BY, so a group's
    # rows are read by the primary key.
    t = time.perf_counter()
    groups = user_groups(client, db)
    for i, group in enumerate(groups, 1):
        client.command(stats_sql(db, group))
        say(f"stats    users {group[0]}..{group[1]}  {i:>3} / {len(groups)}  "
            f"{time.perf_counter() - t:6.1f} s")
    timings["stats_s"] = time.perf_counter() - t

    rollup = recompute_function()
    for table, source, bucket in (("usage_rollup_1m", "usage_stats", "toStartOfMinute"),
                                  ("usage_rollup_1h", "usage_rollup_1m", "toStartOfHour"),
                                  ("usage_rollup_1d", "usage_rollup_1h", "toStartOfDay")):
        t = time.perf_counter()
        if rollup is not None:
            rollup(client, settings, table, start_s - DAY_S, end_s + DAY_S)
        else:
            for group in groups:
                client.command(rollup_sql(db, table, source, bucket, group))
        timings[f"{table}_s"] = time.perf_counter() - t
        say(f"{table:<16} {timings[f'{table}_s']:6.1f} s")

    if optimize:
        t = time.perf_counter()
        for table in ("usage_events", "usage_stats", "usage_rollup_1m", "usage_rollup_1h",
                      "usage_rollup_1d"):
            client.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
            say(f"optimize {table}  {time.perf_counter() - t:6.1f} s")
        timings["optimize_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    per_user = client.query(
        f"SELECT user_id, count() AS n FROM {db}.usage_events GROUP BY user_id ORDER BY n DESC"
    ).result_rows
    rows = {table: int(client.command(f"SELECT count() FROM {db}.{table}"))  # type: ignore[arg-type]
            for table in ("usage_events", "usage_stats", "usage_rollup_1m", "usage_rollup_1h",
                          "usage_rollup_1d")}
    parts = {str(name): int(n) for name, n in client.query(
        f"SELECT table, count() FROM system.parts WHERE database = '{db}' AND active "
        "GROUP BY table").result_rows}
    bytes_on_disk = int(client.command(  # type: ignore[arg-type]
        f"SELECT sum(bytes_on_disk) FROM system.parts WHERE database = '{db}' AND active"))
    heaviest = per_user[0]
    typical = per_user[len(per_user) // 2]
    return {
        "start_s": start_s, "end_s": end_s, "users": len(per_user),
        "heaviest": {"user_id": heaviest[0], "events": int(heaviest[1])},
        "typical": {"user_id": typical[0], "events": int(typical[1])},
        "rows": rows, "parts": parts, "bytes_on_disk": bytes_on_disk,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "rollups_from": "pipeline.rollups" if rollup is not None else "bench.store",
    }


RollupFn = Callable[[Client, Settings, str, int, int], object]


def recompute_function() -> RollupFn | None:
    """The pipeline's own recompute-from-source, when it offers one (see pipeline/rollups.py)."""
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="skip OPTIMIZE TABLE ... FINAL after generation")
    args = parser.parse_args(argv)
    settings = load(dev=True, data_dir=args.data_dir, clickhouse_dsn="")
    summary = generate(settings, events=args.events, users=args.users, days=args.days,
                       seed=args.seed, optimize=args.optimize)
    summary["store_bytes"] = du(args.data_dir)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
