"""`system_stats` for admins who sent `subscribe_monitoring`, every few seconds (only while
the connection's current token has the admin role).

CPU, memory and uptime come from psutil; connection counts from the registry; consumer
lag and throughput from the bridge counters (rates over the last interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psutil

from core.auth import ADMIN_ROLE
from core.clock import Clock
from schemas.ws import ConsumerStats, SystemStats, frame_prefix
from ws_bridge.registry import Registry
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)


class Monitor:
    def __init__(self, registry: Registry, stats: BridgeStats, clock: Clock, *,
                 interval: float = 5.0) -> None:
        self.registry = registry
        self.stats = stats
        self.clock = clock
        self.interval = interval
        self.started = time.monotonic()
        self.process = psutil.Process()
        self.process.cpu_percent(None)
        self._last = (time.monotonic(), 0, 0, 0)
        self._rates = (0.0, 0.0, 0.0)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ws-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def snapshot(self) -> SystemStats:
        memory = self.process.memory_info()
        return SystemStats(
            cpu_percent=self.process.cpu_percent(None),
            memory_rss_bytes=memory.rss,
            memory_percent=round(self.process.memory_percent(), 3),
            uptime_s=round(time.monotonic() - self.started, 3),
            connections=self.registry.total,
            users=self.registry.users(),
            connections_per_user=self.registry.top_users(),
            frames_out_per_s=self._rates[2],
            consumer=ConsumerStats(lag=self.stats.consumer_lag, messages_per_s=self._rates[0],
                                   skipped_per_s=self._rates[1]),
        )

    def frame(self) -> str:
        return frame_prefix("system_stats", self.snapshot(), int(self.clock() * 1000))

    def _update_rates(self) -> None:
        now = time.monotonic()
        then, msgs, skipped, frames = self._last
        span = max(now - then, 1e-6)
        s = self.stats
        self._rates = (round((s.messages_in - msgs) / span, 1),
                       round((s.messages_skipped - skipped) / span, 1),
                       round((s.frames_out - frames) / span, 1))
        self._last = (now, s.messages_in, s.messages_skipped, s.frames_out)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._update_rates()
            # the role again: a re-authentication without it also leaves `monitors`
            monitors = [c for c in self.registry.monitors
                        if c.close_code is None and ADMIN_ROLE in c.roles]
            if not monitors:
                continue
            try:
                frame = self.frame()
            except Exception:
                logger.exception("system_stats failed")
                continue
            for conn in monitors:
                conn.offer_control(frame)
