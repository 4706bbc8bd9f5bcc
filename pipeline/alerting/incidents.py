"""Provider incidents: many users' server-error alerts on one service at once.

When at least `min_users` distinct users have a firing server-error alert on the same
service in the same window, one system-wide notification (user "*", template
`provider_incident`) says so: "openai: 12 users see 5xx rates above their thresholds".

The dataflow evaluates alerts per partition, and each partition holds some of the users,
so detection is two stages:

1. `incident_signal(evaluator, stats)`, beside the evaluator after each window: one
   `IncidentSignal(service, window_start_ms, window_end_ms, user_id)` when this user's
   key has a server-error alert firing at this window.
2. `IncidentCounter.on_signal(signal)`, one global step keyed by service: counts distinct
   users per (service, window) and returns the notification when a window reaches the
   threshold. Duplicated or replayed signals count once; signals may arrive in any
   order across partitions.

A server-error alert is one on `server_error_rate`, or on `error_rate` when 5xx make up at
least half of that window's errors.

One notification per incident, not per window: after a window reaches the threshold, other
qualifying windows within `clear_windows` windows of the incident's span extend the same
incident silently. Only a qualifying window further away starts a new incident (and a new
notification). The id `provider_incident:{service}:{window_start_ms}` names the window that
first reached the threshold, so a replay produces the same id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.alerting.evaluator import AlertEvaluator
from pipeline.alerting.messages import clock
from pipeline.alerting.metrics import from_ms, to_ms
from schemas.alerts import Metric
from schemas.notifications import SYSTEM_USER, Notification, NotificationType
from schemas.stats import StatsRecord

logger = logging.getLogger(__name__)

TEMPLATE = "provider_incident"


class IncidentSignal(NamedTuple):
    service: str
    window_start_ms: int
    window_end_ms: int
    user_id: str


@dataclass(frozen=True, slots=True)
class IncidentConfig:
    min_users: int = 3
    """Distinct users with a firing server-error alert in one window that make an incident."""
    clear_windows: int = 3
    """Qualifying windows this close to an incident belong to it (no new notification)."""
    horizon_windows: int = 12
    """How far behind the newest window a signal may arrive and still be counted."""


def _server_errors_dominate(stats: StatsRecord) -> bool:
    return stats.server_errors > 0 and 2 * stats.server_errors >= (
        stats.server_errors + stats.client_errors
    )


def incident_signal(evaluator: AlertEvaluator, stats: StatsRecord) -> IncidentSignal | None:
    """Stage 1: call after `evaluator.on_window(stats, …)`."""
    for rule in evaluator.firing_rules(stats.user_id, stats.service):
        if rule.metric == Metric.SERVER_ERROR_RATE or (
            rule.metric == Metric.ERROR_RATE and _server_errors_dominate(stats)
        ):
            return IncidentSignal(
                stats.service, to_ms(stats.window_start), to_ms(stats.window_end),
                stats.user_id,
            )
    return None


def incident_notification(service: str, window_start_ms: int, window_end_ms: int,
                          users: int) -> Notification:
    return Notification(
        notification_id=f"{TEMPLATE}:{service}:{window_start_ms}",
        user_id=SYSTEM_USER,
        type=NotificationType.ERROR,
        template=TEMPLATE,
        title=f"{service}: possible provider incident",
        message=(
            f"{service}: {users} users see 5xx rates above their thresholds "
            f"(window ending {clock(window_end_ms)})"
        ),
        created_at=from_ms(window_end_ms),
        data={
            "service": service,
            "users": str(users),
            "window_start": from_ms(window_start_ms).isoformat(),
            "window_end": from_ms(window_end_ms).isoformat(),
        },
    )


class _Service:
    """Stage-2 state of one service; pickles as a tuple of plain data."""

    __slots__ = ("incident", "newest_ms", "windows")

    def __init__(self) -> None:
        self.windows: dict[int, set[str]] = {}  # window start → users (until qualifying)
        self.newest_ms = 0
        self.incident: list[int] | None = None  # [first qualifying start, last one]

    def __getstate__(self) -> tuple[Any, ...]:
        return self.windows, self.newest_ms, self.incident

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.windows, self.newest_ms, self.incident = state


class IncidentCounter:
    """Stage 2: distinct users per (service, window). Key the step by service, or use one."""

    __slots__ = ("_services", "config")

    def __init__(self, config: IncidentConfig | None = None) -> None:
        self.config = config or IncidentConfig()
        self._services: dict[str, _Service] = {}

    def on_signal(self, signal: IncidentSignal) -> Notification | None:
        cfg = self.config
        svc = self._services.get(signal.service)
        if svc is None:
            svc = self._services[signal.service] = _Service()
        window_ms = signal.window_end_ms - signal.window_start_ms
        start = signal.window_start_ms
        if start < svc.newest_ms - cfg.horizon_windows * window_ms:
            logger.debug("incident signal too late: %s", signal)
            return None
        if start > svc.newest_ms:
            svc.newest_ms = start
            floor = start - cfg.horizon_windows * window_ms
            for old in [w for w in svc.windows if w < floor]:
                del svc.windows[old]
        users = svc.windows.get(start)
        if users is None:
            users = svc.windows[start] = set()
        if signal.user_id in users or len(users) >= cfg.min_users:
            return None
        users.add(signal.user_id)
        if len(users) < cfg.min_users:
            return None
        reach = cfg.clear_windows * window_ms
        incident = svc.incident
        if incident is not None and incident[0] - reach <= start <= incident[1] + reach:
            incident[0], incident[1] = min(incident[0], start), max(incident[1], start)
            return None
        svc.incident = [start, start]
        logger.info("provider incident on %s at window %s", signal.service, start)
        return incident_notification(signal.service, start, signal.window_end_ms, len(users))

    def active_incident(self, service: str) -> tuple[int, int] | None:
        """(first, last) qualifying window start of the service's latest incident."""
        svc = self._services.get(service)
        if svc is None or svc.incident is None:
            return None
        return svc.incident[0], svc.incident[1]

    def __getstate__(self) -> tuple[Any, ...]:
        return self.config, self._services

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.config, self._services = state
