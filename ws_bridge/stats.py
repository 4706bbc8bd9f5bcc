"""Counters the bridge keeps for `system_stats` and `/metrics`.

Plain integers bumped on the event loop (and by the Kafka thread for the consumer fields);
`snapshot()` is what a metrics endpoint reads. Connection counts come from the registry.
The Kafka → socket delivery histogram is observed once per dispatched batch (`delivered`),
never per message: the bridge routes 100,000 messages a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric

from core.telemetry import Described, families, untyped

DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, float("inf"))


class Timestamped(Protocol):
    @property
    def timestamp(self) -> int: ...  # the Kafka message's timestamp, epoch ms (0: none)


class BridgeStats:
    """Monotonic counters (and the consumer lag gauge) of one bridge."""

    __slots__ = (
        "activity_dropped",
        "auth_failures",
        "closed_overflow",
        "connections_opened",
        "consumer_lag",
        "decode_errors",
        "delivery",
        "frames_out",
        "messages_in",
        "messages_routed",
        "messages_skipped",
        "produce_errors",
        "rate_limited",
        "rejected_cap",
        "rejected_origin",
        "rejected_pending",
        "replayed",
        "resyncs",
        "stats_coalesced",
        "stats_dropped",
    )

    def __init__(self) -> None:
        self.activity_dropped: int = 0
        self.auth_failures: int = 0
        self.closed_overflow: int = 0
        self.connections_opened: int = 0
        self.consumer_lag: int = -1
        self.decode_errors: int = 0
        self.frames_out: int = 0
        self.messages_in: int = 0
        self.messages_routed: int = 0
        self.messages_skipped: int = 0
        self.produce_errors: int = 0
        self.rate_limited: int = 0
        self.rejected_cap: int = 0
        self.rejected_origin: int = 0
        self.rejected_pending: int = 0
        self.replayed: int = 0
        self.resyncs: int = 0
        self.stats_coalesced: int = 0
        self.stats_dropped: int = 0
        self.delivery = Histogram(
            "keypulse_ws_delivery_seconds",
            "Kafka → socket: per dispatched batch, seconds from the Kafka timestamp of the "
            "batch's first message to the batch's frames being handed to the sockets",
            registry=None, buckets=DELIVERY_BUCKETS)

    def snapshot(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in COUNTERS}

    def delivered(self, batch: Iterable[Timestamped]) -> None:
        """One dispatched batch: observe its first message's delivery latency. O(1): even a
        pass over the batch's timestamps for the oldest cost a third of the dispatch's own
        per-message time (bench figures in docs/operations.md)."""
        first = next(iter(batch), None)  # the router's batches are lists
        if first is not None and first.timestamp > 0:
            self.delivery.observe(max(0.0, time.time() - first.timestamp / 1000))


COUNTERS = tuple(name for name in BridgeStats.__slots__ if name != "delivery")
DESCRIBED: Described = {
    "connections": ("gauge", "open authenticated sockets"),
    "connected_users": ("gauge", "users with at least one open socket"),
    "consumer_lag": ("gauge", "messages behind the log ends of the bridge's topics (-1: not "
                              "known yet)"),
    "connections_opened": ("counter", "sockets authenticated"),
    "auth_failures": ("counter", "sockets closed 4401 before authenticating"),
    "rejected_origin": ("counter", "upgrades refused for their Origin"),
    "rejected_pending": ("counter", "sockets refused (1013): too many waiting to authenticate"),
    "rejected_cap": ("counter", "sockets refused (4429): the user's connection cap"),
    "closed_overflow": ("counter", "sockets closed 4008: a must-deliver frame did not fit"),
    "messages_in": ("counter", "Kafka messages read"),
    "messages_skipped": ("counter", "Kafka messages for nobody connected here"),
    "messages_routed": ("counter", "Kafka messages routed to connections"),
    "decode_errors": ("counter", "Kafka messages that could not be delivered (bad value or "
                                 "key)"),
    "frames_out": ("counter", "frames handed to sockets"),
    "stats_coalesced": ("counter", "stats frames replaced by a newer one while queued"),
    "stats_dropped": ("counter", "stats frames dropped"),
    "activity_dropped": ("counter", "activity frames dropped (slow client)"),
    "rate_limited": ("counter", "client frames over the connection's rate"),
    "produce_errors": ("counter", "client events Kafka refused"),
    "replayed": ("counter", "frames replayed on resume"),
    "resyncs": ("counter", "resumes answered resync_required"),
}


def exposition(values: Mapping[str, object], stats: BridgeStats) -> Iterator[Metric]:
    """The bridge's Prometheus families from its `metrics()` values, read now."""
    yield from families("ws", values, DESCRIBED)
    yield from untyped("ws", {k: v for k, v in values.items() if k not in DESCRIBED})
    yield from stats.delivery.collect()
