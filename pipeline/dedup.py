"""Per-user event_id deduplication over a horizon of event time.

Every id is in one set (O(1) lookups) and in a chunk of its bucket: one minute of event
time, split into chunks of at most `CHUNK` ids. A bucket is dropped when the newest event
time seen is more than the horizon past the bucket's end, so memory follows event time, not
wall time. A cap bounds memory under any load: past it the oldest buckets go early
(`evicted_early` counts the ids that left before their horizon). A snapshot re-pickles only
the chunks that grew since the previous one, so its cost follows the epoch's new ids, not
the horizon's.
"""

from __future__ import annotations

import pickle
from typing import Any

BUCKET_MS = 60_000
CHUNK = 16_384


class Deduplicator:
    __slots__ = ("_all", "_blobs", "_buckets", "_dirty", "cap", "evicted_early", "horizon_ms",
                 "max_ts_ms")

    def __init__(self, horizon_ms: int, cap: int) -> None:
        self.horizon_ms = horizon_ms
        self.cap = cap
        self._all: set[str] = set()
        self._buckets: dict[int, list[list[str]]] = {}
        self._blobs: dict[tuple[int, int], bytes] = {}
        self._dirty: set[int] = set()  # buckets whose last chunk grew since the last snapshot
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
        chunks = self._buckets.get(bucket)
        if chunks is None:
            if bucket + BUCKET_MS + self.horizon_ms < self.max_ts_ms:
                return False  # older than the horizon: nothing left to compare it with
            chunks = self._buckets[bucket] = [[]]
        ids = chunks[-1]
        if len(ids) >= CHUNK:  # the full chunk never changes again: pickle it once, now
            self._blobs[(bucket, len(chunks) - 1)] = pickle.dumps(ids, protocol=5)
            ids = []
            chunks.append(ids)
        ids.append(key)
        self._all.add(key)
        self._dirty.add(bucket)
        if ts_ms > self.max_ts_ms:  # not max(): a call per event on the hot path
            self.max_ts_ms = ts_ms
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
            self.evicted_early += sum(len(ids) for ids in self._buckets[oldest])
            self._drop(oldest)

    def _drop(self, bucket: int) -> None:
        for index, ids in enumerate(self._buckets.pop(bucket)):
            self._all.difference_update(ids)
            self._blobs.pop((bucket, index), None)
        self._dirty.discard(bucket)

    # -- recovery ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        for bucket in self._dirty:
            chunks = self._buckets[bucket]
            self._blobs[(bucket, len(chunks) - 1)] = pickle.dumps(chunks[-1], protocol=5)
        self._dirty.clear()
        return {"blobs": dict(self._blobs), "max_ts_ms": self.max_ts_ms,
                "evicted_early": self.evicted_early}

    @classmethod
    def restore(cls, state: dict[str, Any], horizon_ms: int, cap: int) -> Deduplicator:
        dedup = cls(horizon_ms, cap)
        dedup._blobs = dict(state["blobs"])
        for bucket, index in sorted(dedup._blobs):
            ids = pickle.loads(dedup._blobs[(bucket, index)])
            chunks = dedup._buckets.setdefault(bucket, [])
            assert len(chunks) == index
            chunks.append(ids)
            dedup._all.update(ids)
        dedup.max_ts_ms = state["max_ts_ms"]
        dedup.evicted_early = state["evicted_early"]
        return dedup
