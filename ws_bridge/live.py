"""The live tier (DESIGN §9): provisional stats of each open window, pushed once a second.

Final window stats reach a socket about window + lateness after the window starts. Meanwhile,
for users with a connection subscribed to `stats` (and only them: the feed hands over only
`usage.events` messages whose key is in `Registry.stats_keys`), this module folds the events
into one accumulator per (user, service, window) and pushes `usage_stats_update` with
`"final": false` at most once a second per (user, service) (one frame per window that changed:
two only around a window boundary); the pipeline's record (`"final": true`) replaces it at
close.

Work placement (all of it on the bridge's event loop, events in Kafka's order and final
records a slice at a time behind them (ws_bridge/kafka_feed.py): the Kafka thread only
consumes, filters by key and hands batches over; on a thread of its own the tier fought the
loop for the GIL and fell seconds behind at 20,000 events/s):
- `fold`: a cheap msgspec decode of the fields it needs (junk is skipped and counted, never
  raised), event-id dedup in a bounded set per accumulator, counters, and the latencies (the
  raw values up to RAW_MAX per window, so its percentiles are exact, as the pipeline's are;
  past that core/sketch.py's bins, ±0.5 %). A (user, service) with news goes into the bucket
  of the tick it is due at (its last frame + `interval`).
- `close` (as a final record is handled) drops a window's accumulator and remembers the
  window, so a late event cannot bring a provisional frame back after the final one, and
  keeps the final frame for the user's next update (below); `finalize` is that bookkeeping
  without a frame.
- A loop timer (`TICK_S`, 50 ms) takes the due buckets' users; then, in slices of `SLICE_S`
  of loop time, it takes a few dozen of them at a time (their figures as they are then, not
  as at the tick: a backlog does not make frames stale), encodes each frame once (per user,
  service and window: a cached head and a numbers-only struct, `_data`) and writes a user's
  frames to each of their stats connections in one write: straight to the socket when
  nothing is queued there (`Connection.write_stats`), else through the coalescing stats path
  (`Connection.offer_stats`, same key as the final: a queued provisional frame is replaced
  by a newer one or by the final). A user's services whose last update is as old go along
  with the due one, so their rhythm becomes the user's.
- A final frame (`close`) waits in its (user, service) for the user's next update (at most
  `interval` away: the series is made due if it is not) and goes out first in that same
  write, taken and written in slices as the provisional frames are; one of a user the tier
  does not keep (past a bound) is queued on the connections by the router and written at
  the latest HOLD_S later (`hold`).
- Idle users and expired windows are swept a slice per tick, a round every `SWEEP_S`.

Everything is bounded: services per user (`max_services_per_user`), open windows per
(user, service), accumulators in all, event ids kept for dedup (per window and in all); a
window older than window + lateness + MARGIN_S is dropped, and so is every user who no longer
has a stats-subscribed connection (swept once a second). Provisional figures may differ from
the final ones: events before the socket connected are not counted, nor are events of a
window already dropped; duplicates beyond the id bounds are counted twice (the frame then
says `"deduplicated": false`); late events the pipeline leaves out may be counted.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import re
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from core import sketch
from core.clock import Clock, system_clock
from core.settings import Settings
from core.telemetry import Described
from schemas.events import MIN_TS_MS, SERVICE_PATTERN
from schemas.ws import StatsUpdate
from ws_bridge.connection import STATS, Connection
from ws_bridge.registry import Registry

logger = logging.getLogger(__name__)

TICK_S = 0.05  # how often the loop takes what is due (frames wait at most this for a tick)
INTERVAL_S = 1.0  # at most one provisional frame per (user, service) per interval
# A window's close brings a final frame for every (user, service) at once: writing them at
# once (one write per user) stalled the loop, and the provisional frames behind it, for most
# of a second at 10,000 users; so each waits for its user's next update (at most `interval`:
# `close` makes the series due). A final frame the tier cannot keep (its user is past a
# bound) is queued on the connections and written at the latest this long after (`hold`).
HOLD_S = 2.0
MARGIN_S = 10.0  # a window is dropped once older than window + lateness + this
SWEEP_S = 1.0  # how often expired windows and unwatched users are dropped (a round of sweeps
# over every user, a slice of them per tick: one pass over 10,000 users took the loop ~50 ms)
SLICE_S = 0.002  # loop time per slice of frame encoding and offering
RAW_MAX = 256  # raw latencies kept per window (exact percentiles); past it, sketch bins
MAX_IDS = 16_384  # event ids kept per window for dedup
MAX_IDS_TOTAL = 500_000  # ... and in all (at most ~30 MB)
SMALL_IDS = 64  # up to this many a window keeps its ids in an array (8 bytes each), then a set
MAX_WINDOWS = 8  # open windows per (user, service)
MAX_ACCUMULATORS = 200_000

Quantiles = tuple[float, float, float]
# the nearest ranks (0-based) of p50, p95 and p99 among n ascending values, n ≤ RAW_MAX
_RANKS = [tuple(max(0, math.ceil(q * n) - 1) for q in (0.50, 0.95, 0.99))
          for n in range(RAW_MAX + 1)]


class _Event(msgspec.Struct, gc=False):
    """The fields of a usage event (DESIGN §1) the live tier counts; the rest is skipped by
    the decoder. Bounds as the event's schema, so junk is refused here, not counted."""

    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ts: Annotated[datetime, msgspec.Meta(tz=True)] | int | float
    user_id: str
    service: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    status_code: Annotated[int, msgspec.Meta(ge=100, le=599)]
    latency_ms: Annotated[float, msgspec.Meta(ge=0, le=3_600_000)]
    tokens_in: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None = None
    tokens_out: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None = None
    cost_usd: Annotated[float, msgspec.Meta(ge=0, le=1e12)] | None = None


_decode = msgspec.json.Decoder(_Event).decode
_SERVICE_RE = re.compile(SERVICE_PATTERN)


class _Figures(msgspec.Struct, gc=False):
    """The fields of a provisional `usage_stats_update` after its fixed ones (`Window.head`),
    in `StatsUpdate`'s order, made positionally; `as_of` comes formatted."""

    requests: int
    successes: int
    client_errors: int
    server_errors: int
    success_rate: float
    error_rate: float
    server_error_rate: float
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    tokens_in: int
    tokens_out: int
    cost_usd: float
    schema_version: int
    latency_sum_ms: float
    latency_bins: tuple[()]
    latency_bin_counts: tuple[()]
    final: bool
    as_of: str
    deduplicated: bool


class Window:
    """What one (user, service, window) has seen so far."""

    __slots__ = ("as_of", "bins", "client_errors", "cost", "deduplicated", "dirty", "head",
                 "ids", "latencies", "latency_max", "latency_sum", "requests", "server_errors",
                 "successes", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.requests = self.successes = self.client_errors = self.server_errors = 0
        self.latency_sum = self.latency_max = 0.0
        # ascending (kept sorted as they come: a frame reads its percentiles by index)
        self.latencies: array[float] | None = array("d")  # None once past RAW_MAX
        self.bins: dict[int, int] | None = None  # core.sketch bin → count, past RAW_MAX
        self.tokens_in = self.tokens_out = 0
        self.cost = 0.0
        # hash(event_id) (64 bits: collisions negligible): a C array scanned while small (a
        # few dozen bytes, against 216+ for an empty set and 36 per int in one), then a set
        self.ids: array[int] | set[int] = array("q")
        self.deduplicated = True
        self.as_of = 0  # newest event time counted, epoch ms
        self.dirty = False  # changed since its last frame
        self.head = ""  # its frames' fixed fields as JSON, made at its first frame

    def add_latency(self, latency: float) -> None:
        latencies = self.latencies
        if latencies is not None:
            bisect.insort(latencies, latency)
            if len(latencies) <= RAW_MAX:
                return
            counts: dict[int, int] = {}
            for value in latencies:
                key = sketch.bin_of(value)
                counts[key] = counts.get(key, 0) + 1
            self.bins = counts
            self.latencies = None
            return
        bins = self.bins
        assert bins is not None
        key = sketch.bin_of(latency)
        bins[key] = bins.get(key, 0) + 1

    def quantiles(self) -> Quantiles:
        """p50, p95, p99 by nearest rank: exact from the raw values, else from the bins."""
        ordered = self.latencies
        if ordered is not None:
            i50, i95, i99 = _RANKS[len(ordered)]
            return ordered[i50], ordered[i95], ordered[i99]
        bins = self.bins
        assert bins is not None
        keys = sorted(bins)
        counts = [bins[k] for k in keys]
        top = self.latency_max
        return (sketch.quantile(keys, counts, 0.50, top) or 0.0,
                sketch.quantile(keys, counts, 0.95, top) or 0.0,
                sketch.quantile(keys, counts, 0.99, top) or 0.0)


class Series:
    """One (user, service): its open windows and when its last frame went out."""

    __slots__ = ("due_index", "final_floor", "finals", "last_emit", "pending", "service",
                 "siblings", "user_id", "windows")

    def __init__(self, user_id: str, service: str, siblings: dict[str, Series]) -> None:
        self.user_id = user_id
        self.service = service
        self.siblings = siblings  # the user's series, this one included (service → series)
        self.windows: dict[int, Window] = {}  # window start (epoch ms) → accumulator
        self.last_emit = -math.inf  # tick time of its last frame
        self.final_floor = -1  # start (ms) of the newest window whose final record passed
        self.pending = False  # has news, in the bucket of tick `due_index` (LiveTier._due)
        self.due_index = 0
        # final frames (window start in s → frame prefix) to go with the user's next update
        self.finals: dict[int, str] | None = None


class Due:
    """A frame to send: a provisional one (its window's figures as they were taken, as the
    JSON text of the frame's data: `LiveTier.update` reads it back as a `StatsUpdate`), or a
    final one (`prefix`: the frame as the router prepared it)."""

    __slots__ = ("data", "prefix", "series", "start_ms")

    def __init__(self, series: Series, start_ms: int, data: str, prefix: str = "") -> None:
        self.series = series
        self.start_ms = start_ms
        self.data = data
        self.prefix = prefix


class LiveTier:
    """Provisional per-window stats for the users watching `stats` on this bridge."""

    def __init__(self, settings: Settings, registry: Registry, clock: Clock = system_clock, *,
                 tick: float = TICK_S, interval: float = INTERVAL_S,
                 margin: float = MARGIN_S) -> None:
        self.registry = registry
        self.clock = clock
        self.tick = tick
        self.interval = interval
        self.window_ms = settings.window_seconds * 1000
        # windows whose start is at or before now - horizon are dropped (and not counted)
        self.horizon_ms = self.window_ms + int((settings.allowed_lateness_seconds + margin) * 1000)
        self.skew_ms = settings.max_clock_skew_seconds * 1000
        self.max_services = settings.max_services_per_user
        # The bridge calls everything on its event loop; the lock is for callers elsewhere.
        self.lock = threading.Lock()
        self._users: dict[bytes, dict[str, Series]] = {}
        # series with a changed window, by the tick (index on the tick grid) they are due
        # at: a tick takes its own buckets, never a scan of everything pending
        self._due: dict[int, list[Series]] = {}
        self._seconds: dict[int, str] = {}  # epoch second → RFC 3339 up to the seconds
        self._next_sweep = 0.0
        self._sweeping: list[bytes] = []  # the users the running round has still to sweep
        self._sweep_slice = 1  # users swept per tick in this round
        self._backlog: deque[dict[str, Series]] = deque()  # due users, to take and send
        self._held: deque[tuple[float, Connection]] = deque()  # (write by, connection)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None
        self._tick_at = 0.0  # loop time of the next tick
        self._draining = False
        # counters (`counters()`); accumulators and ids are gauges
        self.events = 0
        self.duplicates = 0
        self.invalid = 0
        self.late = 0
        self.overflow = 0
        self.frames = 0
        self.accumulators = 0
        self.ids = 0

    # -- folding (the loop) -------------------------------------------------------------

    def fold(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Count `usage.events` messages (key, value) of watched users into their windows.
        (The hot path at 20,000 events/s: names are bound locally and counters kept in
        locals, written back once per batch.)"""
        now_ms = int(self.clock() * 1000)
        oldest = now_ms - self.horizon_ms  # a window starting at or before this is gone
        newest_ts = now_ms + self.skew_ms  # the pipeline refuses events further ahead
        window_ms = self.window_ms
        users = self._users
        decode = _decode
        schedule = self._schedule
        invalid = late = overflow = duplicates = counted = 0
        with self.lock:
            for key, value in messages:
                try:
                    event = decode(value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    invalid += 1
                    continue
                ts = event.ts
                if ts.__class__ is int:
                    ts_ms: int = ts  # type: ignore[assignment]
                elif ts.__class__ is float:
                    ts_ms = int(ts)  # type: ignore[arg-type]
                else:
                    ts_ms = int(ts.timestamp() * 1000)  # type: ignore[union-attr]
                if not MIN_TS_MS <= ts_ms <= newest_ts:
                    invalid += 1
                    continue
                start = ts_ms - ts_ms % window_ms
                if start <= oldest:
                    late += 1
                    continue
                services = users.get(key)
                if services is None:
                    if event.user_id.encode() != key:
                        invalid += 1
                        continue
                    services = users[key] = {}
                series = services.get(event.service)
                if series is None:
                    series = self._new_series(services, key, event.user_id, event.service)
                    if series is None:  # counted there
                        continue
                elif event.user_id != series.user_id:
                    invalid += 1
                    continue
                if start <= series.final_floor:
                    late += 1
                    continue
                window = series.windows.get(start)
                if window is None:
                    if (len(series.windows) >= MAX_WINDOWS
                            or self.accumulators >= MAX_ACCUMULATORS):
                        overflow += 1
                        continue
                    window = series.windows[start] = Window()
                    self.accumulators += 1
                digest = hash(event.event_id)
                ids = window.ids
                if digest in ids:
                    duplicates += 1
                    continue
                if len(ids) < MAX_IDS and self.ids < MAX_IDS_TOTAL:
                    if ids.__class__ is set:
                        ids.add(digest)  # type: ignore[union-attr]
                    else:
                        ids.append(digest)  # type: ignore[union-attr]
                        if len(ids) > SMALL_IDS:
                            window.ids = set(ids)
                    self.ids += 1
                else:
                    window.deduplicated = False
                counted += 1
                window.requests += 1
                status = event.status_code
                if status < 400:
                    window.successes += 1
                elif status < 500:
                    window.client_errors += 1
                else:
                    window.server_errors += 1
                latency = event.latency_ms
                window.latency_sum += latency
                if latency > window.latency_max:
                    window.latency_max = latency
                window.add_latency(latency)
                if event.tokens_in:
                    window.tokens_in += event.tokens_in
                if event.tokens_out:
                    window.tokens_out += event.tokens_out
                if event.cost_usd:
                    window.cost += event.cost_usd
                if ts_ms > window.as_of:
                    window.as_of = ts_ms
                window.dirty = True
                if not series.pending:
                    schedule(series)
            self.invalid += invalid
            self.late += late
            self.overflow += overflow
            self.duplicates += duplicates
            self.events += counted

    def _schedule(self, series: Series) -> None:
        """Under the lock: `series` has news; due on the first tick `interval` after its last
        frame (at once, on the next tick, if that is past)."""
        series.pending = True
        due_at = series.last_emit + self.interval
        index = math.ceil(due_at / self.tick - 1e-6) if due_at > -math.inf else 0
        series.due_index = index
        bucket = self._due.get(index)
        if bucket is None:
            self._due[index] = [series]
        else:
            bucket.append(series)

    def _new_series(self, services: dict[str, Series], key: bytes, user_id: str,
                    service: str) -> Series | None:
        """A new (user, service), or None (counted) past the bounds or for a bad name."""
        if user_id.encode() != key:  # the message's key names another user than its value
            self.invalid += 1
            return None
        if not _SERVICE_RE.fullmatch(service):
            self.invalid += 1
            return None
        if len(services) >= self.max_services:
            self.overflow += 1
            return None
        series = services[service] = Series(user_id, service, services)
        return series

    def finalize(self, finals: Iterable[tuple[str, str, int]]) -> None:
        """Final records (user_id, service, window start in epoch seconds) passed: their
        windows (and older ones) are dropped, and later events for them are not counted.
        Called before the final frames are dispatched, so a provisional frame taken after
        this is never sent after the final one (`deliver_user` checks the floor too)."""
        with self.lock:
            for user_id, service, window_s in finals:
                self._close_window(user_id, service, window_s)

    def close(self, finals: list[tuple[str, str, int, str]]) -> list[int]:
        """Final records (user_id, service, window start in s, frame prefix) passed: as
        `finalize`, and each frame waits in its (user, service) to go out with the user's
        next update (the series is made due if it is not: within `interval`), in the same
        write, taken and written in slices as the provisional frames are (loop only). Returns
        the indexes of those it cannot keep (past a bound): the caller sends them."""
        left: list[int] = []
        with self.lock:
            for index, (user_id, service, window_s, prefix) in enumerate(finals):
                series = self._close_window(user_id, service, window_s)
                if series is None:
                    left.append(index)
                    continue
                waiting = series.finals
                if waiting is None:
                    series.finals = {window_s: prefix}
                else:
                    waiting[window_s] = prefix  # a record again (a replay): the newest
                if not series.pending:
                    self._schedule(series)
        return left

    def _close_window(self, user_id: str, service: str, window_s: int) -> Series | None:
        """Under the lock: the window's final record passed (see `finalize`); its series, or
        None if the tier does not keep it (past a bound)."""
        key = user_id.encode()
        services = self._users.get(key)
        if services is None:
            services = self._users[key] = {}
        series = services.get(service)
        if series is None:
            series = self._new_series(services, key, user_id, service)
            if series is None:
                return None
        start = window_s * 1000
        if start > series.final_floor:
            series.final_floor = start
        windows = series.windows
        if windows:
            for old in [s for s in windows if s <= start]:
                self._drop_window(series, old)
        return series

    def _drop_window(self, series: Series, start: int) -> None:
        window = series.windows.pop(start)
        self.accumulators -= 1
        self.ids -= len(window.ids)

    # -- event loop -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the timer on `loop` until `stop()`."""
        self._loop = loop
        self._tick_at = loop.time() + self.tick
        self._timer = loop.call_at(self._tick_at, self._on_tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._backlog.clear()
        while self._held:  # what waited goes out now
            self._held.popleft()[1].flush()
        for services in self._users.values():  # and the final frames waiting in the tier
            finals = [Due(series, window_s * 1000, "", prefix)
                      for series in services.values() if series.finals
                      for window_s, prefix in series.finals.items()]
            if finals:
                self.deliver_user(finals, 0)
            for series in services.values():
                series.finals = None

    @property
    def busy(self) -> bool:
        """Users are waiting for their provisional frames (loop only)."""
        return bool(self._backlog)

    def hold(self, conn: Connection) -> None:
        """`conn` has final frames queued: they go out with its user's next update (the
        user is made due if nothing of theirs is), or HOLD_S from now for a user the tier
        does not keep (loop only). A pending series is never swept: it is taken, and its
        user's stats connections are written then, with or without provisional frames."""
        services = self._users.get(conn.key)
        if services:  # a pending series is taken (and the user's connections written) soon
            with self.lock:
                for series in services.values():
                    if series.pending:
                        return
                self._schedule(next(iter(services.values())))
            return
        self._held.append((time.monotonic() + HOLD_S, conn))

    def _write_held(self) -> None:
        """Write what waited HOLD_S (a connection written since has nothing left: cheap)."""
        held = self._held
        now = time.monotonic()
        while held and held[0][0] <= now:
            held.popleft()[1].flush()

    def _on_tick(self) -> None:
        loop = self._loop
        assert loop is not None
        # the next tick on schedule, or now if this one came late (uvloop hands back a plain
        # Handle, without `when()`, for a time already past)
        self._tick_at = max(self._tick_at + self.tick, loop.time())
        self._timer = loop.call_at(self._tick_at, self._on_tick)
        if self._held:
            self._write_held()
        if self._backlog:  # the last tick's users are still being served: they go first
            return
        # on the tick grid, so frames of one series are at least `interval` apart exactly
        now = math.floor(self.clock() / self.tick) * self.tick
        try:
            with self.lock:
                self._backlog.extend(self._due_users(now))
        except Exception:  # the timer must survive a bug in one tick
            logger.exception("live tier tick failed")
            return
        if self._backlog and not self._draining:
            self._draining = True
            loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Take the figures of due users (under the lock, a few dozen users at a time: the
        newest figures, not the tick's), encode and offer their frames, for `SLICE_S`;
        then yield to the loop."""
        backlog = self._backlog
        deadline = time.perf_counter() + SLICE_S
        clock = self.clock()
        ts_ms = int(clock * 1000)
        # the tick grid at the take (not the tick's time: a user taken late in a long
        # backlog would be taken again early in the next one), so a series' frames are
        # `interval` apart on the grid, as without a backlog
        now = math.floor(clock / self.tick) * self.tick
        try:
            while backlog:
                taken: list[list[Due]] = []
                idle: list[str] = []  # due for a final frame only: nothing new to add
                with self.lock:
                    for _ in range(min(32, len(backlog))):
                        siblings = backlog.popleft()
                        due = self._take(siblings, now)
                        if due:
                            taken.append(due)
                        elif siblings:
                            idle.append(next(iter(siblings.values())).user_id)
                for due in taken:
                    self.deliver_user(due, ts_ms)
                for user_id in idle:
                    self._flush(user_id)
                if time.perf_counter() >= deadline:
                    break
        except Exception:  # one bad frame must not stop the tier: it is dropped
            logger.exception("live tier: a provisional frame failed")
        if backlog and self._loop is not None:
            self._loop.call_soon(self._drain)
        else:
            self._draining = False

    def collect(self, now: float) -> list[Due]:
        """What is due at `now` (seconds), taken at once (the timer takes the same, a few
        users at a time, see `_drain`), after a whole round of sweeping."""
        due: list[Due] = []
        with self.lock:
            self._next_sweep = min(self._next_sweep, now)
            self._sweep_round(now, everyone=True)
            for siblings in self._due_users(now):
                due.extend(self._take(siblings, now))
        return due

    def _due_users(self, now: float) -> list[dict[str, Series]]:
        """Under the lock: the users with a pending (user, service) whose last update is at
        least `interval` old (each as its series by service), from the buckets of the ticks
        up to `now`. Sweeps a slice of the users (a round every SWEEP_S)."""
        self._sweep_round(now)
        interval = self.interval
        last = math.floor(now / self.tick + 1e-6)
        buckets = self._due
        users: dict[int, dict[str, Series]] = {}
        for index in sorted(i for i in buckets if i <= last):
            for series in buckets.pop(index):
                if not series.pending or series.due_index != index:
                    continue  # taken with a sibling, swept, or due at another tick since
                if now - series.last_emit >= interval:
                    users[id(series.siblings)] = series.siblings
                else:  # float rounding on the grid: its tick is the next one
                    series.due_index = last + 1
                    buckets.setdefault(last + 1, []).append(series)
        return list(users.values())

    def _take(self, siblings: dict[str, Series], now: float) -> list[Due]:
        """Under the lock: one user's update at `now`, a frame per changed window, oldest
        first (two only around a window boundary, while the previous window still takes
        in-flight events: both go in the same update, so neither waits), for each of the
        user's services whose last update is at least `interval` old: they go together
        (their rhythm becomes the user's), in one socket write per connection."""
        due: list[Due] = []
        interval = self.interval
        for series in siblings.values():
            finals = series.finals
            if finals:  # final frames go with this update, the series due or not
                series.finals = None
                for window_s in sorted(finals):
                    due.append(Due(series, window_s * 1000, "", finals[window_s]))
            if now - series.last_emit < interval:
                continue
            series.last_emit = now
            series.pending = False  # a bucket still holding it skips it
            windows = series.windows
            changed = [start for start, window in windows.items() if window.dirty]
            if len(changed) > 1:
                changed.sort()
            for start in changed:
                window = windows[start]
                window.dirty = False
                due.append(Due(series, start, self._data(series, start, window)))
        return due

    def _data(self, series: Series, start: int, window: Window) -> str:
        """The `usage_stats_update` data of a window's figures now, as JSON: a `StatsUpdate`
        with `"final": false` (the fields of the stats record, in its order). Its fixed
        fields are made once per window, the others are a `_Figures` (numbers only: a fifth
        of the cost of a `StatsUpdate` with its datetimes, and a third of an f-string's; at
        10,000 users this runs 15,000 times a second, on the loop).
        `tests/ws/test_live_tier.py` checks it decodes to what msgspec writes for the
        `StatsUpdate`."""
        head = window.head
        if not head:
            head = window.head = (
                f'{{"user_id":{_encode(series.user_id).decode()},'
                f'"service":{_encode(series.service).decode()},'
                f'"window_start":"{self._rfc3339(start)}Z",'
                f'"window_end":"{self._rfc3339(start + self.window_ms)}Z",'
                f'"window_seconds":{self.window_ms // 1000},')
        requests = window.requests
        successes = window.successes
        client_errors = window.client_errors
        server_errors = window.server_errors
        latency_sum = window.latency_sum
        p50, p95, p99 = window.quantiles()
        as_of = window.as_of
        return head + _encode(_Figures(
            requests, successes, client_errors, server_errors, successes / requests,
            (client_errors + server_errors) / requests, server_errors / requests,
            latency_sum / requests, p50, p95, p99, window.latency_max, window.tokens_in,
            window.tokens_out, round(window.cost, 9), 1, latency_sum, (), (), False,
            f"{self._rfc3339(as_of)}.{as_of % 1000:03d}Z", window.deduplicated,
        ))[1:].decode()

    def _rfc3339(self, ms: int) -> str:
        """`YYYY-MM-DDTHH:MM:SS` (UTC) of an epoch time in ms, cached per second."""
        second = ms // 1000
        text = self._seconds.get(second)
        if text is None:
            if len(self._seconds) >= 4096:
                self._seconds.clear()
            text = self._seconds[second] = datetime.fromtimestamp(
                second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return text

    @staticmethod
    def update(due: Due) -> StatsUpdate:
        """The `usage_stats_update` data of a due frame, typed (the stats record's fields)."""
        return _update(due.data)

    def deliver(self, due: Due, ts_ms: int) -> None:
        """One due frame: see `deliver_user`."""
        self.deliver_user([due], ts_ms)

    def deliver_user(self, dues: list[Due], ts_ms: int) -> None:
        """Encode each due frame (all of one user) once and write them, the final ones first,
        to the user's stats connections, in one write per connection: at once if nothing is
        queued there, else offered after what is (coalesced by (service, window): a slow
        socket gets the newest) and written with it. A provisional frame whose window's
        final record passed meanwhile is left out (the final frame must stay the last)."""
        conns = self.registry.by_user.get(dues[0].series.user_id)
        if not conns:
            return
        prefixes: list[str] = []
        keys: list[tuple[str, int]] = []
        provisional = 0
        for due in dues:
            series = due.series
            if due.prefix:  # a final frame
                prefixes.append(due.prefix)
            elif due.start_ms <= series.final_floor:
                continue
            else:  # frame_prefix's output, with the data written once (`_data`)
                prefixes.append(f'{_HEAD}{due.data},"ts":{ts_ms},')
                provisional += 1
            keys.append((series.service, due.start_ms // 1000))
        self.frames += provisional
        for conn in conns:
            if not conn.channels & STATS or (prefixes and conn.write_stats(prefixes)):
                continue
            for prefix, key in zip(prefixes, keys, strict=True):
                conn.offer_stats(prefix, key, flush=False)
            conn.flush()  # with the final frames queued for this update, if any

    def _flush(self, user_id: str) -> None:
        """Write what the user's stats connections have queued (their final frames)."""
        for conn in self.registry.by_user.get(user_id, ()):
            if conn.channels & STATS:
                conn.flush()

    def _sweep_round(self, now: float, *, everyone: bool = False) -> None:
        """Under the lock: a round of sweeping starts every SWEEP_S and takes a slice of the
        users at each tick, so that it ends within SWEEP_S (or all of them, `everyone`)."""
        if not self._sweeping and now >= self._next_sweep:
            self._sweeping = list(self._users)
            self._sweep_slice = math.ceil(len(self._sweeping) * self.tick / SWEEP_S) + 1
            self._next_sweep = now + SWEEP_S
        keys = self._sweeping
        if keys:
            count = len(keys) if everyone else min(len(keys), self._sweep_slice)
            self._sweep(now, keys[-count:])
            del keys[-count:]

    def _sweep(self, now: float, keys: Iterable[bytes]) -> None:
        """Drop expired windows of these users, and the state of those nobody here watches
        any more (under the lock; `stats_keys` is the loop's own, read without its lock)."""
        watched = self.registry.stats_keys
        oldest = int(now * 1000) - self.horizon_ms
        users = self._users
        for key in keys:
            services = users.get(key)
            if services is None:
                continue
            if key not in watched:
                for series in services.values():
                    for start in list(series.windows):
                        self._drop_window(series, start)
                    series.pending = False  # its bucket skips it
                del self._users[key]
                continue
            for service, series in list(services.items()):
                for start in [s for s in series.windows if s <= oldest]:
                    self._drop_window(series, start)
                if (not series.windows and not series.pending and series.final_floor <= oldest
                        and now - series.last_emit >= self.interval):
                    del services[service]
            if not services:
                del self._users[key]

    def counters(self) -> dict[str, int]:
        """For `/metrics` (prefixed `live_`): events counted, duplicates, invalid, late and
        over-bound events skipped, provisional frames, open accumulators, event ids kept."""
        return {"live_events": self.events, "live_duplicates": self.duplicates,
                "live_invalid": self.invalid, "live_late": self.late,
                "live_overflow": self.overflow, "live_frames": self.frames,
                "live_accumulators": self.accumulators, "live_ids": self.ids}


LIVE_DESCRIBED: Described = {
    "live_events": ("counter", "usage events counted into provisional windows"),
    "live_duplicates": ("counter", "usage events counted once already (same event_id)"),
    "live_invalid": ("counter", "usage events the live tier refused (not an event, key/value "
                                "user mismatch, bad service name, ts out of range)"),
    "live_late": ("counter", "usage events of a window already final or dropped"),
    "live_overflow": ("counter", "usage events not counted: a live-tier bound was hit"),
    "live_frames": ("counter", "provisional stats frames built"),
    "live_accumulators": ("gauge", "open provisional windows"),
    "live_ids": ("gauge", "event ids kept for deduplication"),
}

_encode = msgspec.json.Encoder().encode
_update = msgspec.json.Decoder(StatsUpdate).decode
_HEAD = '{"event":"usage_stats_update","data":'

