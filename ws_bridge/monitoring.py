"""`system_stats` for admins who sent `subscribe_monitoring`, every few seconds (only while
the connection's current token has the admin role).

The frame carries the system snapshot (schemas/system.py) that `GET /v1/admin/system`
answers, built by the same builder (the process's core.telemetry.Telemetry.system):
connections and the bridge's counters come from the `ws` provider the bridge registers, the
rest as the builder finds it in this process (`keypulse ws` has no ClickHouse: that section
is null, with its reason). What blocks (ClickHouse, Kafka's log ends) is measured in a worker
thread before each round, never on the event loop; the frame itself uses the figures measured
last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from core.auth import ADMIN_ROLE
from core.clock import Clock
from core.settings import Settings
from core.system import NOT_MEASURED, SystemSnapshots
from schemas.system import SystemSnapshot
from schemas.ws import frame_prefix
from ws_bridge.registry import Registry

logger = logging.getLogger(__name__)


class Monitor:
    def __init__(self, settings: Settings, registry: Registry, clock: Clock,
                 snapshots: SystemSnapshots, *, interval: float = 5.0) -> None:
        self.settings = settings
        self.registry = registry
        self.clock = clock
        self.interval = interval
        self.snapshots = snapshots
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a frame went out without figures: measure them now

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ws-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def snapshot(self) -> SystemSnapshot:
        """Now, without waiting on ClickHouse or Kafka (their last measured figures)."""
        return self.snapshots.snapshot(self.settings, now=self.clock(), block=False)

    def frame(self) -> str:
        snapshot = self.snapshot()
        if NOT_MEASURED in snapshot.unavailable.values():
            self._wake.set()
        return frame_prefix("system_stats", snapshot, int(self.clock() * 1000))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            # the role again: a re-authentication without it also leaves `monitors`
            monitors = [c for c in self.registry.monitors
                        if c.close_code is None and ADMIN_ROLE in c.roles]
            if not monitors:
                continue
            try:
                await loop.run_in_executor(None, self._refresh)
                frame = self.frame()
            except Exception:
                logger.exception("system_stats failed")
                continue
            for conn in monitors:
                if conn.close_code is None and ADMIN_ROLE in conn.roles:
                    conn.offer_control(frame)

    def _refresh(self) -> None:
        self.snapshots.refresh(self.settings, stale_only=True)
