"""Counters the bridge keeps for `system_stats` and the future `/metrics`.

Plain integers bumped on the event loop (and by the Kafka thread for the consumer fields);
`snapshot()` is what a metrics endpoint reads. Connection counts come from the registry.
"""

from __future__ import annotations


class BridgeStats:
    """Monotonic counters (and the consumer lag gauge) of one bridge."""

    __slots__ = (
        "activity_dropped",
        "auth_failures",
        "closed_overflow",
        "connections_opened",
        "consumer_lag",
        "decode_errors",
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

    def snapshot(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in self.__slots__}
