"""Request-volume anomaly detection (`requests_anomaly`) against a learned baseline.

Per (user_id, service) the detector keeps an exponentially weighted moving mean and
variance of the request count per window (West's incremental EWMA):

    d = x - mean;  mean += a·d;  var = (1 - a)·(var + a·d²)

with `a = max(alpha, 1/n)` so the first windows average plainly instead of starting from
zero. Each window is scored against the baseline *before* it is folded in:

    std = max(√var, √mean, min_std)      # √mean: a Poisson count is never tighter
    z   = (x - mean) / std

The rule's threshold is the z-score (default `> 4`); the evaluator also requires
`|x - mean| ≥ min_delta` so a key moving from 2 to 15 requests does not page anyone.
Before `warmup_windows` observations there is no score ("no data").

The baseline is robust to the anomaly it reports: a window outside `mean ± clip_z·std`
moves the mean by only `alpha·clip_z·std` towards it and leaves the variance untouched.
A short spike is therefore not learned as normal (the next ordinary window is back in
band), while a lasting change of level is adopted gradually: a jump from 100 to 500
requests per window keeps firing for roughly 50 windows before it counts as the new normal.

Windows without any request produce no stats record; the detector counts the missing
windows between two records as zeros (they are real observations of silence). After more
than `reset_after_windows` missing windows the baseline is forgotten and warm-up restarts:
a key that is used in bursts an hour apart has no meaningful per-window rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class AnomalyConfig:
    alpha: float = 0.1
    """EWMA weight of the newest window; ~1/alpha windows of memory."""
    warmup_windows: int = 20
    """Observations needed before a window is scored."""
    clip_z: float = 4.0
    """Values are folded into the baseline clipped to mean ± clip_z·std."""
    min_std: float = 1.0
    """Absolute floor on the standard deviation."""
    min_delta: float = 10.0
    """A breach also needs |requests - baseline| ≥ this many requests."""
    reset_after_windows: int = 30
    """More missing windows than this in a row restart the warm-up."""


class AnomalyScore(NamedTuple):
    z: float
    expected: float
    std: float
    delta: float


# A baseline is a plain list [mean, var, n, last_window_start_ms]: compact when pickled.
Baseline = list[float]


class AnomalyDetector:
    """Baselines for many (user_id, service) keys; picklable as a plain dict of lists."""

    __slots__ = ("_baselines", "config")

    def __init__(self, config: AnomalyConfig | None = None) -> None:
        self.config = config or AnomalyConfig()
        self._baselines: dict[tuple[str, str], Baseline] = {}

    def observe(
        self, key: tuple[str, str], requests: int, window_start_ms: int, window_ms: int
    ) -> AnomalyScore | None:
        """Score one window's request count, then learn from it.

        None during warm-up, and for a window not after the last one seen (a replayed or
        duplicated record is neither scored nor learned twice).
        """
        cfg = self.config
        base = self._baselines.get(key)
        if base is not None:
            last_start = base[3]
            if window_start_ms <= last_start:
                return None
            missing = int((window_start_ms - last_start) // window_ms) - 1
            if missing > cfg.reset_after_windows:
                base = None
            else:
                for _ in range(missing):
                    self._fold(base, 0.0)
        if base is None:
            base = self._baselines[key] = [float(requests), 0.0, 1.0, float(window_start_ms)]
            return None
        score: AnomalyScore | None = None
        if base[2] >= cfg.warmup_windows:
            mean = base[0]
            std = max(math.sqrt(base[1]), math.sqrt(mean), cfg.min_std)
            delta = requests - mean
            score = AnomalyScore(delta / std, mean, std, delta)
        self._fold(base, float(requests))
        base[3] = float(window_start_ms)
        return score

    def _fold(self, base: Baseline, value: float) -> None:
        cfg = self.config
        mean, var, n = base[0], base[1], base[2] + 1.0
        base[2] = n
        alpha = max(cfg.alpha, 1.0 / n)
        if n > cfg.warmup_windows:
            limit = cfg.clip_z * max(math.sqrt(var), math.sqrt(mean), cfg.min_std)
            if value > mean + limit or value < mean - limit:
                # an outlier: damp the mean towards it, learn no variance from it
                base[0] = mean + alpha * (limit if value > mean else -limit)
                return
        diff = value - mean
        incr = alpha * diff
        base[0] = mean + incr
        base[1] = (1.0 - alpha) * (var + diff * incr)

    def baseline(self, key: tuple[str, str]) -> tuple[float, float, int] | None:
        """(mean, variance, observations) of one key, for tests and diagnostics."""
        base = self._baselines.get(key)
        return None if base is None else (base[0], base[1], int(base[2]))

    def prune(self, before_ms: int) -> int:
        """Forget keys whose last window started before `before_ms`; returns how many."""
        stale = [key for key, base in self._baselines.items() if base[3] < before_ms]
        for key in stale:
            del self._baselines[key]
        return len(stale)

    def forget(self, key: tuple[str, str]) -> None:
        self._baselines.pop(key, None)

    def __len__(self) -> int:
        return len(self._baselines)

    def __getstate__(self) -> tuple[AnomalyConfig, dict[tuple[str, str], Baseline]]:
        return self.config, self._baselines

    def __setstate__(self, state: Any) -> None:
        self.config, self._baselines = state
