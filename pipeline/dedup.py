"""Per-user event_id deduplication over a horizon of event time.

Every id is in one set (O(1) lookups) and in the list of its bucket: one minute of event
time. A bucket is dropped when the newest event time seen is more than the horizon past the
bucket's end, so memory follows event time, not wall time; that event time never passes wall
time + the clock-skew bound (`bound`), so one event dated 2099 cannot expire everyone's ids.
A cap bounds memory under any load: `KEYPULSE_DEDUP_MAX_IDS` is a total over the events
topic's partitions, and each partition's deduplicator gets its share (the total divided by
the partitions, rounded up). Past it the oldest buckets go early (`evicted_early` counts the
ids that left before their horizon).

The rule itself (duplicate or not, which bucket, when a bucket is too old to open) is applied
by the processor's per-event loop, its only implementation; `tests/unit/pipeline/oracle.py`
restates it plainly and a property test holds the two together.

Persistence. Bytewax writes a step's whole state at every snapshot, so a million ids in the
state would be pickled and written every epoch. Instead each partition appends the ids that
are new since its last snapshot to a log file (`IdLog`) and the snapshot records only the
log's generation and length: every id is written once. A resume reads the log up to that
length and cuts off what a crashed epoch appended after it. When most of a log's ids have
expired, the next snapshot starts a new generation holding the live ids only. Without a log
directory (in-memory tests) the ids travel in the snapshot itself.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUCKET_MS = 60_000
_FRAME = struct.Struct("<Q")  # the length of the pickled [(bucket, ids), ...] that follows


def _dumps_without_memo(frames: list[tuple[int, list[str]]]) -> bytes:
    """Pickled as usual, minus the memo: lists of distinct strings refer to nothing twice,
    and a million ids pickle in a third of the time (pickle.loads reads them as ever)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.fast = True  # no memo (safe without shared or cyclic references)
    pickler.dump(frames)
    return buffer.getvalue()


class IdLog:
    """The append-only id files of one partition: `p<partition>-<generation>.ids`."""

    def __init__(self, directory: Path, partition: int) -> None:
        self.directory = directory
        self.partition = partition
        self.generation = 0
        self.length = 0
        self.ids = 0  # ids written to the current generation (live or expired)

    def path(self, generation: int) -> Path:
        return self.directory / f"p{self.partition}-{generation:08d}.ids"

    def _generations(self) -> list[int]:
        prefix = f"p{self.partition}-"
        return sorted(int(p.stem.removeprefix(prefix)) for p in self.directory.glob(
            f"{prefix}*.ids") if p.stem.removeprefix(prefix).isdigit())

    def start(self, buckets: dict[int, list[str]]) -> None:
        """A new generation holding `buckets`; the previous one stays until the next
        snapshot is taken (the last committed snapshot may still refer to it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self._generations()
        for old in existing:  # a fresh start (generation 0) keeps none of an earlier run's
            if old < self.generation or self.generation == 0:
                self.path(old).unlink(missing_ok=True)
        self.generation = (existing[-1] + 1) if existing else 1
        self.length = self.ids = 0
        self.path(self.generation).touch()
        self.append(list(buckets.items()))

    def append(self, frames: list[tuple[int, list[str]]]) -> None:
        if not frames:
            return
        data = _dumps_without_memo(frames)
        with self.path(self.generation).open("r+b") as f:
            f.seek(self.length)
            f.write(_FRAME.pack(len(data)))
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())  # on disk before Bytewax commits the snapshot naming it
        self.length += _FRAME.size + len(data)
        self.ids += sum(len(ids) for _, ids in frames)

    def load(self, generation: int, length: int) -> list[tuple[int, list[str]]]:
        """The frames of a snapshot: the file cut to `length`, other generations removed."""
        self.generation, self.length = generation, length
        path = self.path(generation)
        size = path.stat().st_size if path.exists() else 0
        if size < length:
            msg = (f"dedup log {path} holds {size} of the {length} bytes the snapshot refers "
                   "to; the recovery store and the data directory do not match")
            raise RuntimeError(msg)
        with path.open("r+b") as f:
            f.truncate(length)  # what a crashed epoch appended after the snapshot
            data = f.read(length)
        for other in self._generations():
            if other != generation:
                self.path(other).unlink(missing_ok=True)
        frames: list[tuple[int, list[str]]] = []
        offset = 0
        while offset < length:
            (size,) = _FRAME.unpack_from(data, offset)
            offset += _FRAME.size
            frames.extend(pickle.loads(data[offset : offset + size]))
            offset += size
        self.ids = sum(len(ids) for _, ids in frames)
        return frames


class Deduplicator:
    """The dedup state of one partition; the processor's per-event loop applies the rule.

    The loop's API, documented because the loop inlines it for speed:
    - `ids`: every kept id: the user_id and the event_id joined by 0x1F, the unit separator
      (ids are unique per user). An id in it is a duplicate.
    - `max_ts_ms`: the newest event time recorded. The loop keeps it in a local and writes it
      back before each `bucket()` call (which compares against it) and at the end of a batch.
    - `bucket(ts_ms)`: the id list of `ts_ms`'s bucket, or None when ids that old are not
      kept; a new id goes into both `ids` and that list.
    - `expire()` once per batch; `bound(newest_ms)` once per batch, before the loop.
    """

    __slots__ = ("_buckets", "_logged", "cap", "evicted_early", "horizon_ms", "ids", "log",
                 "max_ts_ms")

    def __init__(self, horizon_ms: int, cap: int, log: IdLog | None = None) -> None:
        self.horizon_ms = horizon_ms
        self.cap = cap
        self.log = log
        self.ids: set[str] = set()
        self._buckets: dict[int, list[str]] = {}
        self._logged: dict[int, int] = {}  # bucket → how many of its ids the log holds
        self.max_ts_ms = 0
        self.evicted_early = 0

    def __len__(self) -> int:
        return len(self.ids)

    def bound(self, newest_ms: int) -> None:
        """Expiry follows event time no later than `newest_ms` (wall time + the clock-skew
        bound): admission keeps new ids within it; this brings back an older snapshot's."""
        if self.max_ts_ms > newest_ms:
            self.max_ts_ms = newest_ms

    def bucket(self, ts_ms: int) -> list[str] | None:
        """The ids of `ts_ms`'s bucket, opened if new; None when ids that old are not kept."""
        ids = self._buckets.get(ts_ms - ts_ms % BUCKET_MS)
        if ids is None:
            ids = self._open_bucket(ts_ms)
        return ids

    def _open_bucket(self, ts_ms: int) -> list[str] | None:
        """The new bucket of `ts_ms`; None when its ids are not kept."""
        bucket = ts_ms - ts_ms % BUCKET_MS
        if self.horizon_ms <= 0 or bucket + BUCKET_MS + self.horizon_ms < self.max_ts_ms:
            return None  # disabled, or older than the horizon: nothing to compare it with
        ids: list[str] = []
        self._buckets[bucket] = ids
        return ids

    def expire(self) -> None:
        """Drop buckets whose end is more than the horizon behind the newest event time, then
        the oldest ones while over the cap. Called once per poll batch, so memory stays
        within the cap plus one batch of ids."""
        limit = self.max_ts_ms - self.horizon_ms
        for bucket in sorted(self._buckets):
            if bucket + BUCKET_MS >= limit:
                break
            self._drop(bucket)
        if len(self.ids) > self.cap:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        while len(self.ids) > self.cap and len(self._buckets) > 1:
            oldest = min(self._buckets)
            self.evicted_early += len(self._buckets[oldest])
            self._drop(oldest)

    def _drop(self, bucket: int) -> None:
        self.ids.difference_update(self._buckets.pop(bucket))
        self._logged.pop(bucket, None)

    # -- recovery ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {"max_ts_ms": self.max_ts_ms,
                                 "evicted_early": self.evicted_early}
        if self.log is None:
            state["buckets"] = {b: list(ids) for b, ids in self._buckets.items()}
            return state
        if self.log.generation == 0 or self.log.ids > 2 * len(self.ids) + 100_000:
            self.log.start(self._buckets)  # a new generation: the live ids only
        else:
            self.log.append([(b, ids[self._logged.get(b, 0):]) for b, ids in
                             self._buckets.items() if len(ids) > self._logged.get(b, 0)])
        self._logged = {b: len(ids) for b, ids in self._buckets.items()}
        state["log"] = (self.log.generation, self.log.length)
        return state

    @classmethod
    def restore(
        cls, state: dict[str, Any], horizon_ms: int, cap: int, log: IdLog | None = None
    ) -> Deduplicator:
        dedup = cls(horizon_ms, cap, log)
        if "buckets" in state:
            frames = list(state["buckets"].items())
        elif log is not None:
            frames = log.load(*state["log"])
        else:
            msg = "this snapshot keeps its dedup ids in a log file: give the processor its log"
            raise RuntimeError(msg)
        for bucket, ids in frames:
            dedup._buckets.setdefault(bucket, []).extend(ids)
            dedup.ids.update(ids)
        if log is not None and log.generation:
            dedup._logged = {b: len(ids) for b, ids in dedup._buckets.items()}
        dedup.max_ts_ms = state["max_ts_ms"]
        dedup.expire()  # a log may hold buckets that had expired (or been evicted) since
        dedup.evicted_early = state["evicted_early"]
        return dedup
