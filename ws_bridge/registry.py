"""Who is connected: connections by user, and the key sets the Kafka thread filters with.

The event loop owns the registry; the Kafka thread only reads the key sets (`user_keys`,
`activity_keys`, `stats_keys`) and writes `positions` (the next offset it will examine per
partition), both under `lock`.
Taking the lock when a connection registers makes its starting position exact: every
message at or past it is examined after the user's key is in the set, so it is routed live;
every message before it is covered by resume replay.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from core.kafka import partition_for
from ws_bridge.connection import ACTIVITY, STATS, Connection


class Registry:
    def __init__(self, *, max_per_user: int, alerts_topic: str, notifications_topic: str,
                 apikeys_topic: str) -> None:
        self.max_per_user = max_per_user
        self.alerts_topic = alerts_topic
        self.notifications_topic = notifications_topic
        self.apikeys_topic = apikeys_topic
        self.lock = threading.Lock()
        self.by_user: dict[str, list[Connection]] = {}
        self.user_keys: set[bytes] = set()
        self.activity_keys: set[bytes] = set()
        self.stats_keys: set[bytes] = set()  # users with a `stats` subscriber (live tier)
        self.positions: dict[tuple[str, int], int] = {}  # written by the Kafka thread
        self.partitions: dict[str, int] = {}  # topic → partition count, set by the feed
        self.monitors: set[Connection] = set()
        self.total = 0

    def add(self, conn: Connection) -> bool:
        """Register `conn` and set its stream position; False if the user is at the cap."""
        conns = self.by_user.get(conn.user_id)
        if conns is not None and len(conns) >= self.max_per_user:
            return False
        with self.lock:
            conn.part_a, conn.pos_a = self._position(self.alerts_topic, conn.key)
            conn.part_n, conn.pos_n = self._position(self.notifications_topic, conn.key)
            conn.part_k, conn.pos_k = self._position(self.apikeys_topic, conn.key)
            self.user_keys.add(conn.key)
            if conn.channels & STATS:
                self.stats_keys.add(conn.key)
            if conns is None:
                self.by_user[conn.user_id] = [conn]
            else:
                conns.append(conn)
        self.total += 1
        return True

    def remove(self, conn: Connection) -> None:
        conns = self.by_user.get(conn.user_id)
        if conns is None or conn not in conns:
            return
        self.monitors.discard(conn)
        with self.lock:
            conns.remove(conn)
            if not conns:
                del self.by_user[conn.user_id]
                self.user_keys.discard(conn.key)
            self._refresh_activity(conn.user_id, conn.key)
        self.total -= 1

    def set_channels(self, conn: Connection, channels: int) -> None:
        conn.channels = channels
        with self.lock:
            self._refresh_activity(conn.user_id, conn.key)

    def _refresh_activity(self, user_id: str, key: bytes) -> None:
        if any(c.channels & ACTIVITY for c in self.by_user.get(user_id, ())):
            self.activity_keys.add(key)
        else:
            self.activity_keys.discard(key)
        if any(c.channels & STATS for c in self.by_user.get(user_id, ())):
            self.stats_keys.add(key)
        else:
            self.stats_keys.discard(key)

    def _position(self, topic: str, key: bytes) -> tuple[int, int]:
        count = self.partitions.get(topic)
        if not count:
            return 0, 0
        partition = partition_for(key, count)
        return partition, self.positions.get((topic, partition), 0)

    def position_of(self, topic: str, key: bytes) -> tuple[int, int]:
        """(partition, next offset the feed will examine) of `key` in `topic`."""
        with self.lock:
            return self._position(topic, key)

    # -- reads ------------------------------------------------------------------------

    def of_user(self, user_id: str) -> list[Connection]:
        return self.by_user.get(user_id, [])

    def __iter__(self) -> Iterator[Connection]:
        for conns in list(self.by_user.values()):
            yield from conns

    def users(self) -> int:
        return len(self.by_user)

    def top_users(self, limit: int = 100) -> dict[str, int]:
        counts = sorted(((len(c), u) for u, c in self.by_user.items()), reverse=True)[:limit]
        return {user: n for n, user in counts}
