"""Human sentences for alert records, one format per kind of metric.

    openai error rate 12.5% > 5% over the 10 s window ending 14:03:20 UTC (250 requests)
    openai error rate back to 1.2% (≤ 5%) over the 10 s window ending 14:04:00 UTC (300 requests)

Rates print as percentages, latencies in ms, cost in dollars, counts with thousands
separators. Only called when an alert changes state, so clarity beats speed here.
"""

from __future__ import annotations

from core.clock import from_ms
from pipeline.alerting.metrics import NEGATION
from schemas.alerts import AlertRule, Metric

LABELS: dict[str, str] = {
    Metric.ERROR_RATE: "error rate",
    Metric.SERVER_ERROR_RATE: "5xx rate",
    Metric.SUCCESS_RATE: "success rate",
    Metric.LATENCY_P50_MS: "p50 latency",
    Metric.LATENCY_P95_MS: "p95 latency",
    Metric.LATENCY_P99_MS: "p99 latency",
    Metric.LATENCY_AVG_MS: "average latency",
    Metric.REQUESTS: "request count",
    Metric.COST_USD: "cost",
    Metric.TOKENS: "token count",
    Metric.REQUESTS_ANOMALY: "request volume",
}

_RATES = frozenset({Metric.ERROR_RATE, Metric.SERVER_ERROR_RATE, Metric.SUCCESS_RATE})
_LATENCIES = frozenset(
    {Metric.LATENCY_P50_MS, Metric.LATENCY_P95_MS, Metric.LATENCY_P99_MS, Metric.LATENCY_AVG_MS}
)


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_value(metric: str, value: float) -> str:
    """`0.125` → `12.5%` for rates, `2340.0` → `2,340 ms`, `1.5` → `$1.50`, `1234` → `1,234`."""
    if metric in _RATES:
        return _trim(f"{value * 100:,.2f}") + "%"
    if metric in _LATENCIES:
        return (f"{value:,.0f}" if abs(value) >= 100 else _trim(f"{value:,.1f}")) + " ms"
    if metric == Metric.COST_USD:
        return f"${value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"${value:.4g}"
    if metric == Metric.REQUESTS_ANOMALY:
        return "z " + _trim(f"{value:,.1f}")
    return _trim(f"{value:,.2f}")


def clock(ms: int) -> str:
    """`14:03:20 UTC`."""
    return from_ms(ms).strftime("%H:%M:%S UTC")


def _span(window_seconds: int, windows: int, end_ms: int) -> str:
    if windows <= 1:
        return f"over the {window_seconds} s window ending {clock(end_ms)}"
    return (
        f"for {windows} consecutive {window_seconds} s windows, "
        f"the last ending {clock(end_ms)}"
    )


def _requests(count: int) -> str:
    return f"{count:,} request" if count == 1 else f"{count:,} requests"


def breach(
    rule: AlertRule, service: str, value: float, *, window_seconds: int, windows: int,
    end_ms: int, requests: int,
) -> str:
    metric = rule.metric
    return (
        f"{service} {LABELS[metric]} {format_value(metric, value)} {rule.op} "
        f"{format_value(metric, rule.threshold)} {_span(window_seconds, windows, end_ms)} "
        f"({_requests(requests)})"
    )


def recovery(
    rule: AlertRule, service: str, value: float, *, window_seconds: int, windows: int,
    end_ms: int, requests: int,
) -> str:
    metric = rule.metric
    return (
        f"{service} {LABELS[metric]} back to {format_value(metric, value)} "
        f"({NEGATION[rule.op]} {format_value(metric, rule.threshold)}) "
        f"{_span(window_seconds, windows, end_ms)} ({_requests(requests)})"
    )


def anomaly(
    rule: AlertRule, service: str, *, z: float, requests: int, expected: float, std: float,
    window_seconds: int, windows: int, end_ms: int, firing: bool,
) -> str:
    head = "spike" if firing else "back in band"
    if firing and rule.op in ("<", "<="):
        head = "drop"
    sign = rule.op if firing else NEGATION[rule.op]
    return (
        f"{service} request volume {head}: {_requests(requests)} "
        f"{_span(window_seconds, windows, end_ms)} against a baseline of "
        f"{expected:,.0f} ± {std:,.0f} (z {z:,.1f} {sign} {_trim(f'{rule.threshold:,.2f}')})"
    )


def idle(rule: AlertRule, service: str, *, last_end_ms: int, idle_seconds: int) -> str:
    return (
        f"{service} {LABELS[rule.metric]} alert resolved: no traffic to evaluate for "
        f"{idle_seconds} s after {clock(last_end_ms)}"
    )


def withdrawn(rule: AlertRule, service: str, *, reason: str) -> str:
    return f"{service} {LABELS[rule.metric]} alert resolved: rule {rule.name!r} was {reason}"
