"""Reading a rule's metric from a closed window, and comparing it with the threshold.

Tables rather than `if` chains, so evaluating a rule is two dict lookups and a call.
`requests_anomaly` is not read from the window directly: its value is the z-score the
anomaly detector (`pipeline.alerting.anomaly`) computes from the window's request count.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from schemas.alerts import Metric, Op
from schemas.stats import StatsRecord

Extractor = Callable[[StatsRecord], float]


def _tokens(stats: StatsRecord) -> float:
    return float(stats.tokens_in + stats.tokens_out)


EXTRACTORS: dict[str, Extractor] = {
    Metric.ERROR_RATE: operator.attrgetter("error_rate"),
    Metric.SERVER_ERROR_RATE: operator.attrgetter("server_error_rate"),
    Metric.SUCCESS_RATE: operator.attrgetter("success_rate"),
    Metric.LATENCY_P50_MS: operator.attrgetter("latency_p50_ms"),
    Metric.LATENCY_P95_MS: operator.attrgetter("latency_p95_ms"),
    Metric.LATENCY_P99_MS: operator.attrgetter("latency_p99_ms"),
    Metric.LATENCY_AVG_MS: operator.attrgetter("latency_avg_ms"),
    Metric.REQUESTS: operator.attrgetter("requests"),
    Metric.COST_USD: operator.attrgetter("cost_usd"),
    Metric.TOKENS: _tokens,
}
"""Every `Metric` except `requests_anomaly` → how to read it from a `StatsRecord`."""

COMPARE: dict[str, Callable[[float, float], bool]] = {
    Op.GT: operator.gt,
    Op.GE: operator.ge,
    Op.LT: operator.lt,
    Op.LE: operator.le,
}
"""`value OP threshold` is a breach."""

NEGATION: dict[str, str] = {Op.GT: "≤", Op.GE: "<", Op.LT: "≥", Op.LE: ">"}
"""The symbol for "clean" under each op, for resolved messages."""


def metric_value(metric: str, stats: StatsRecord) -> float:
    """The value of `metric` in `stats` (not defined for `requests_anomaly`)."""
    return float(EXTRACTORS[metric](stats))

