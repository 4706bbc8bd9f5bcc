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
    __slots__ = ("_all", "_blobs", "_buckets", "_pickled", "cap", "evicted_early", "horizon_ms",
                 "max_ts_ms")

    def __init__(self, horizon_ms: int, cap: int) -> None:
        self.horizon_ms = horizon_ms
        self.cap = cap
        self._all: set[str] = set()
        self._buckets: dict[int, list[list[str]]] = {}
        self._blobs: dict[tuple[int, int], bytes] = {}
        self._pickled: dict[tuple[int, int], int] = {}  # chunk → its length when pickled
        self.max_ts_ms = 0
        self.evicted_early = 0

    def __len__(self) -> int:
        return len(self._all)

    def seen(self, user_id: str, event_id: str, ts_ms: int) -> bool:
        """True if this (user, event_id) was seen within the horizon; records it otherwise."""
        key = f"{user_id}\x1f{event_id}"
        if key in self._all:
            return True
        chunks = self._buckets.get(ts_ms - ts_ms % BUCKET_MS)
        if chunks is None or len(chunks[-1]) >= CHUNK:
            chunks = self._open_chunk(ts_ms)
            if chunks is None:
                return False
        chunks[-1].append(key)
        self._all.add(key)
        if ts_ms > self.max_ts_ms:  # not max(): a call per event on the hot path
            self.max_ts_ms = ts_ms
        return False

    def _open_chunk(self, ts_ms: int) -> list[list[str]] | None:
        """The bucket of `ts_ms` with room in its last chunk; None when ids are not kept."""
        if self.horizon_ms <= 0:
            return None
        bucket = ts_ms - ts_ms % BUCKET_MS
        chunks = self._buckets.get(bucket)
        if chunks is None:
            if bucket + BUCKET_MS + self.horizon_ms < self.max_ts_ms:
                return None  # older than the horizon: nothing left to compare it with
            chunks = self._buckets[bucket] = [[]]
        else:  # the full chunk never changes again: pickle it once, now
            self._pickle(bucket, len(chunks) - 1, chunks[-1])
            chunks.append([])
        return chunks

    def expire(self) -> None:
        """Drop buckets whose end is more than the horizon behind the newest event time, then
        the oldest ones while over the cap. Called once per poll batch, so memory stays
        within the cap plus one batch of ids."""
        limit = self.max_ts_ms - self.horizon_ms
        for bucket in sorted(self._buckets):
            if bucket + BUCKET_MS >= limit:
                break
            self._drop(bucket)
        if len(self._all) > self.cap:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        while len(self._all) > self.cap and len(self._buckets) > 1:
            oldest = min(self._buckets)
            self.evicted_early += sum(len(ids) for ids in self._buckets[oldest])
            self._drop(oldest)

    def _drop(self, bucket: int) -> None:
        for index, ids in enumerate(self._buckets.pop(bucket)):
            self._all.difference_update(ids)
            self._blobs.pop((bucket, index), None)
            self._pickled.pop((bucket, index), None)

    def _pickle(self, bucket: int, index: int, ids: list[str]) -> None:
        if self._pickled.get((bucket, index)) != len(ids):
            self._blobs[(bucket, index)] = pickle.dumps(ids, protocol=5)
            self._pickled[(bucket, index)] = len(ids)

    # -- recovery ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        for bucket, chunks in self._buckets.items():  # only the last chunk can have grown
            self._pickle(bucket, len(chunks) - 1, chunks[-1])
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
            dedup._pickled[(bucket, index)] = len(ids)
        dedup.max_ts_ms = state["max_ts_ms"]
        dedup.evicted_early = state["evicted_early"]
        return dedup
