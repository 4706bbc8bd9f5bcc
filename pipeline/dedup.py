"""Per-user event_id deduplication over a horizon of event time.

Every id is in one set (O(1) lookups) and in the list of its bucket: one minute of event
time. A bucket is dropped when the newest event time seen is more than the horizon past the
bucket's end, so memory follows event time, not wall time. A cap bounds memory under any
load: past it the oldest buckets go early (`evicted_early` counts the ids that left before
their horizon). Snapshots re-pickle only the buckets that changed since the last one.
"""

from __future__ import annotations

import pickle
from typing import Any

BUCKET_MS = 60_000


class Deduplicator:
    __slots__ = (
        "_all",
        "_blobs",
        "_buckets",
        "_dirty",
        "cap",
        "evicted_early",
        "horizon_ms",
        "max_ts_ms",
    )

    def __init__(self, horizon_ms: int, cap: int) -> None:
        self.horizon_ms = horizon_ms
        self.cap = cap
        self._all: set[str] = set()
        self._buckets: dict[int, list[str]] = {}
        self._blobs: dict[int, bytes] = {}
        self._dirty: set[int] = set()
        self.max_ts_ms = 0
        self.evicted_early = 0

    def __len__(self) -> int:
        return len(self._all)

    def seen(self, user_id: str, event_id: str, ts_ms: int) -> bool:
        """True if this (user, event_id) was seen within the horizon; records it otherwise."""
        if self.horizon_ms <= 0:
            return False
        key = f"{user_id}\x1f{event_id}"
        if key in self._all:
            return True
        bucket = ts_ms - ts_ms % BUCKET_MS
        ids = self._buckets.get(bucket)
        if ids is None:
            if bucket + BUCKET_MS + self.horizon_ms < self.max_ts_ms:
                return False  # older than the horizon: nothing left to compare it with
            ids = self._buckets[bucket] = []
        ids.append(key)
        self._all.add(key)
        self._dirty.add(bucket)
        self.max_ts_ms = max(self.max_ts_ms, ts_ms)
        if len(self._all) > self.cap:
            self._evict_oldest()
        return False

    def expire(self) -> None:
        """Drop buckets whose end is more than the horizon behind the newest event time."""
        limit = self.max_ts_ms - self.horizon_ms
        for bucket in sorted(self._buckets):
            if bucket + BUCKET_MS >= limit:
                break
            self._drop(bucket)

    def _evict_oldest(self) -> None:
        while len(self._all) > self.cap and len(self._buckets) > 1:
            oldest = min(self._buckets)
            self.evicted_early += len(self._buckets[oldest])
            self._drop(oldest)

    def _drop(self, bucket: int) -> None:
        self._all.difference_update(self._buckets.pop(bucket))
        self._blobs.pop(bucket, None)
        self._dirty.discard(bucket)

    # -- recovery ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        for bucket in self._dirty:
            self._blobs[bucket] = pickle.dumps(self._buckets[bucket], protocol=5)
        self._dirty.clear()
        return {
            "blobs": dict(self._blobs),
            "max_ts_ms": self.max_ts_ms,
            "evicted_early": self.evicted_early,
        }

    @classmethod
    def restore(cls, state: dict[str, Any], horizon_ms: int, cap: int) -> Deduplicator:
        dedup = cls(horizon_ms, cap)
        dedup._blobs = dict(state["blobs"])
        dedup._buckets = {b: pickle.loads(blob) for b, blob in dedup._blobs.items()}
        for ids in dedup._buckets.values():
            dedup._all.update(ids)
        dedup.max_ts_ms = state["max_ts_ms"]
        dedup.evicted_early = state["evicted_early"]
        return dedup
