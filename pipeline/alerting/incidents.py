"""Provider incidents: many users' server-error alerts on one service at once.

When enough distinct users *with real traffic history* have a firing server-error alert on
the same *known* service in the same window, one system-wide notification (user "*",
template `provider_incident` of the registry) says so: "openai: 12 users see 5xx rates
above their thresholds". Everybody is told, so a handful of fresh accounts must not be able
to raise one (for a made-up service, or a real one):

* a user counts only once their key (user, service) has had `history_windows` clean
  windows (at least `history_min_requests` requests, no incident signal) before it signals:
  a *trusted* key. Trust lasts until the key's state is pruned (idle `state_idle_seconds`);
* a service is *known* when at least `min_known_users` trusted keys are live on it (its
  population, summed over every partition);
* the users needed in one window grow with the population:
  `max(min_users, ceil(population_share × population))`.

The dataflow evaluates alerts per partition, and each partition holds some of the users,
so detection is two stages:

1. In each partition, beside the evaluator (`AlertingHook`): `incident_signal(evaluator,
   stats)` is one `IncidentSignal(service, window_start_ms, window_end_ms, user_id)` when
   the user's key has a server-error alert firing at this window, and `TrafficHistory`
   decides whether the key is trusted. Only trusted keys' signals leave the partition,
   together with `PopulationChange(service, ±1)` when a key becomes trusted or is pruned.
2. `IncidentCounter.on_item(item)`, one global step keyed by service: sums the population
   and counts distinct users per (service, window), and returns the notification when a
   window reaches the threshold. Duplicated or replayed signals count once; signals may
   arrive in any order across partitions (a key's +1 precedes its signals: same partition,
   same order). The population is read as each signal arrives; it changes slowly (a key
   needs `history_windows` windows to join it, an hour of silence to leave it).

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
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from core.clock import from_ms, to_ms
from core.templates import Templates
from pipeline.alerting.evaluator import AlertEvaluator
from pipeline.alerting.notify import default_templates
from schemas.alerts import Metric
from schemas.notifications import SYSTEM_USER, Notification
from schemas.stats import StatsRecord

logger = logging.getLogger(__name__)

TEMPLATE = "provider_incident"


Key = tuple[str, str]
"""(user_id, service)"""


class IncidentSignal(NamedTuple):
    service: str
    window_start_ms: int
    window_end_ms: int
    user_id: str


class PopulationChange(NamedTuple):
    """A key of `service` became trusted (+1) or was pruned while trusted (-1)."""

    service: str
    delta: int


IncidentInput = IncidentSignal | PopulationChange
"""What stage 1 sends to stage 2 (route both by `.service`)."""


@dataclass(frozen=True, slots=True)
class IncidentConfig:
    min_users: int = 3
    """Fewest distinct users with a firing server-error alert in one window for an incident."""
    population_share: float = 0.1
    """... and at least this share of the service's population (trusted live keys)."""
    min_known_users: int = 10
    """A service with fewer trusted keys than this is unknown: its signals are ignored."""
    history_windows: int = 30
    """Clean windows a key needs before its signals count (trust; 5 minutes at 10 s)."""
    history_min_requests: int = 10
    """Requests a window needs to count towards a key's history."""
    clear_windows: int = 3
    """Qualifying windows this close to an incident belong to it (no new notification)."""
    horizon_windows: int = 12
    """How far behind the newest window a signal may arrive and still be counted."""

    def __post_init__(self) -> None:
        if not 1 <= self.history_windows <= _CLEAN_MASK:
            msg = f"history_windows must be within 1..{_CLEAN_MASK}"
            raise ValueError(msg)
        if self.min_users < 1 or self.min_known_users < 1:
            msg = "min_users and min_known_users must be at least 1"
            raise ValueError(msg)

    def required_users(self, population: int) -> int:
        """Distinct signalling users one window needs on a service of this population."""
        return max(self.min_users, math.ceil(self.population_share * population))


_CLEAN_BITS = 16
_CLEAN_MASK = (1 << _CLEAN_BITS) - 1


class TrafficHistory:
    """Stage 1's memory of who has real traffic: per key, its clean windows and last window.

    A key is stored as one int, `last_window_start_ms << 16 | clean_windows` (clean windows
    capped at `windows`): 32 bytes where a list would take 130, for every key with traffic.
    Keys whose windows carry fewer than `min_requests` requests are not stored at all.
    """

    __slots__ = ("_keys", "min_requests", "windows")

    def __init__(self, windows: int, min_requests: int) -> None:
        self.windows = windows
        self.min_requests = min_requests
        self._keys: dict[Key, int] = {}

    def observe(self, key: Key, window_start_ms: int, requests: int, signalled: bool) -> bool:
        """One closed window of `key`; True when this window made the key trusted.

        A window that signals (or has too few requests) does not count as clean; a window
        not after the key's last one (a replay) changes nothing."""
        if requests < self.min_requests:
            return False
        packed = self._keys.get(key)
        clean = 0
        if packed is not None:
            if window_start_ms <= packed >> _CLEAN_BITS:
                return False
            clean = packed & _CLEAN_MASK
        became = False
        if not signalled and clean < self.windows:
            clean += 1
            became = clean == self.windows
        self._keys[key] = window_start_ms << _CLEAN_BITS | clean
        return became

    def trusted(self, key: Key) -> bool:
        packed = self._keys.get(key)
        return packed is not None and packed & _CLEAN_MASK >= self.windows

    def prune(self, before_ms: int) -> list[Key]:
        """Forget keys whose last window started before `before_ms`; returns the trusted
        ones among them (each is a -1 for its service's population)."""
        floor = before_ms << _CLEAN_BITS
        stale = [key for key, packed in self._keys.items() if packed < floor]
        trusted = []
        for key in stale:
            if self._keys.pop(key) & _CLEAN_MASK >= self.windows:
                trusted.append(key)
        return trusted

    def __len__(self) -> int:
        return len(self._keys)

    def __getstate__(self) -> tuple[int, int, dict[Key, int]]:
        return self.windows, self.min_requests, self._keys

    def __setstate__(self, state: tuple[int, int, dict[Key, int]]) -> None:
        self.windows, self.min_requests, self._keys = state


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
                          users: int, templates: Templates | None = None) -> Notification:
    """The system-wide notification (template `provider_incident`) of one incident."""
    return (templates or default_templates()).notification(
        TEMPLATE,
        notification_id=f"{TEMPLATE}:{service}:{window_start_ms}",
        user_id=SYSTEM_USER,
        created_at=from_ms(window_end_ms),
        fields={
            "service": service,
            "users": str(users),
            "window_start": from_ms(window_start_ms).isoformat(),
            "window_end": from_ms(window_end_ms).isoformat(),
        },
    )


class _Service:
    """Stage-2 state of one service; pickles as a tuple of plain data."""

    __slots__ = ("incident", "newest_ms", "population", "windows")

    def __init__(self) -> None:
        # window start → users signalling in it; None once it qualified (counted no further)
        self.windows: dict[int, set[str] | None] = {}
        self.newest_ms = 0
        self.incident: list[int] | None = None  # [first qualifying start, last one]
        self.population = 0  # trusted live keys, over every partition

    def __getstate__(self) -> tuple[Any, ...]:
        return self.windows, self.newest_ms, self.incident, self.population

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        if len(state) == 3:  # before trust: no population known (its keys earn it again)
            state = (*state, 0)
        self.windows, self.newest_ms, self.incident, self.population = state


class IncidentCounter:
    """Stage 2: population and distinct users per (service, window). Key the step by
    service (state per service), or use one for everything. `templates` word the
    notification (default: the packaged registry); like `config`, not part of the state."""

    __slots__ = ("_services", "config", "templates")

    def __init__(self, config: IncidentConfig | None = None,
                 templates: Templates | None = None) -> None:
        self.config = config or IncidentConfig()
        self.templates = templates
        self._services: dict[str, _Service] = {}

    def on_item(self, item: IncidentInput) -> Notification | None:
        if isinstance(item, PopulationChange):
            self.on_population(item)
            return None
        return self.on_signal(item)

    def on_population(self, change: PopulationChange) -> None:
        svc = self._services.get(change.service)
        if svc is None:
            svc = self._services[change.service] = _Service()
        svc.population += change.delta
        if svc.population <= 0:  # nobody left who could signal: nothing worth keeping
            del self._services[change.service]

    def population(self, service: str) -> int:
        svc = self._services.get(service)
        return 0 if svc is None else svc.population

    def on_signal(self, signal: IncidentSignal) -> Notification | None:
        cfg = self.config
        svc = self._services.get(signal.service)
        if svc is None or svc.population < cfg.min_known_users:
            logger.debug("incident signal for a service not known yet: %s", signal)
            return None
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
        if start in svc.windows:
            users = svc.windows[start]
            if users is None:
                return None  # this window qualified already
        else:
            users = svc.windows[start] = set()
        if signal.user_id in users:
            return None
        users.add(signal.user_id)
        if len(users) < cfg.required_users(svc.population):
            return None
        svc.windows[start] = None
        reach = cfg.clear_windows * window_ms
        incident = svc.incident
        if incident is not None and incident[0] - reach <= start <= incident[1] + reach:
            incident[0], incident[1] = min(incident[0], start), max(incident[1], start)
            return None
        svc.incident = [start, start]
        logger.info("provider incident on %s at window %s (%s of %s users)", signal.service,
                    start, len(users), svc.population)
        return incident_notification(signal.service, start, signal.window_end_ms, len(users),
                                     self.templates)

    def active_incident(self, service: str) -> tuple[int, int] | None:
        """(first, last) qualifying window start of the service's latest incident."""
        svc = self._services.get(service)
        if svc is None or svc.incident is None:
            return None
        return svc.incident[0], svc.incident[1]

    def is_empty(self) -> bool:
        """No service with a population: the dataflow may forget this state."""
        return not self._services

    def __getstate__(self) -> tuple[Any, ...]:
        return self.config, self._services

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.config, self._services = state
        self.templates = None
