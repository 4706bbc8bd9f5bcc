"""One client that never reads, among 500 that do: it is cut off (4008), the others get
everything, and the bridge's memory for it stays bounded."""

from __future__ import annotations

import asyncio
import time

import msgspec

from core.settings import Settings
from schemas.ws import ServerFrame
from tests.ws.harness import login, raw_upgrade, token
from ws_bridge import Limits
from ws_bridge.connection import CURSOR_NOTIFICATIONS, NOTIFICATIONS
from ws_bridge.router import Mode, Routed

CLIENTS = 500
BROADCASTS = 40
SLOW_MESSAGES = 3000


def test_never_reading_client_is_isolated(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    settings = unit_settings.model_copy(update={"ws_max_connections_per_user": 5})
    server = bridges(settings, kafka=False, limits=Limits(max_queue=32))
    bridge = server.bridge
    slow = raw_upgrade(server.port, token(settings, "slow"))

    async def main() -> None:
        clients = []
        for start in range(0, CLIENTS, 50):
            batch = await asyncio.gather(*(login(server.url, settings, f"user-{i}")
                                           for i in range(start, start + 50)))
            clients.extend(ws for ws, _ in batch)
        assert bridge.registry.total == CLIENTS + 1
        payload = "x" * 2000
        slow_batch = [Routed("slow", NOTIFICATIONS, Mode.CURSOR,
                             f'{{"event":"new_notification","data":{{"m":"{payload}"}},"ts":1,',
                             offset=i, cursor_topic=CURSOR_NOTIFICATIONS)
                      for i in range(SLOW_MESSAGES)]
        peak = 0
        for b in range(BROADCASTS):
            server.call(bridge.fanout.dispatch,
                        [Routed("*", 0, Mode.BROADCAST,
                                f'{{"event":"system_notification","data":{{"b":{b}}},"ts":1,'),
                         *slow_batch[b * 75:(b + 1) * 75]])
            await asyncio.sleep(0.01)
            for conn in bridge.registry.by_user.get("slow", []):
                peak = max(peak, len(conn.queue))

        async def collect(ws) -> list[int]:  # type: ignore[no-untyped-def]
            got = []
            while len(got) < BROADCASTS:
                frame = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 30),
                                            type=ServerFrame)
                assert frame.event == "system_notification"
                got.append(frame.seq)
            return got

        started = time.monotonic()
        results = await asyncio.gather(*(collect(ws) for ws in clients))
        assert all(seqs == list(range(2, BROADCASTS + 2)) for seqs in results)
        assert time.monotonic() - started < 60
        deadline = time.monotonic() + 10
        while bridge.stats.closed_overflow < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert bridge.stats.closed_overflow == 1
        assert peak <= 32
        deadline = time.monotonic() + 10
        while "slow" in bridge.registry.by_user and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "slow" not in bridge.registry.by_user
        assert bridge.registry.total == CLIENTS
        for ws in clients:
            await ws.close()

    try:
        asyncio.run(main())
    finally:
        slow.close()
