"""A process-wide registry of metric providers, read by `/metrics` and system stats.

Each part registers a callable returning a flat dict of numbers (`register("pipeline",
METRICS.snapshot)`); readers call `collect()`. Nothing here imports a part, so the API can
show the pipeline's and the bridge's counters without importing either.

A part may also say how its numbers read in Prometheus: `exposition` yields the library's
metric families (HELP, TYPE, labels, histograms), built at scrape time from the same counters
(`core.telemetry.families`). A part without one is exposed untyped, one
`keypulse_<part>_<name>` per number.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

Provider = Callable[[], Mapping[str, object]]
Exposition = Callable[[], "Iterable[Metric]"]


class Part(NamedTuple):
    provider: Provider
    exposition: Exposition | None


_lock = threading.Lock()
_parts: dict[str, Part] = {}


def register(name: str, provider: Provider, exposition: Exposition | None = None) -> None:
    with _lock:
        _parts[name] = Part(provider, exposition)


def unregister(name: str) -> None:
    with _lock:
        _parts.pop(name, None)


def parts() -> dict[str, Part]:
    """The registered parts now, by name."""
    with _lock:
        return dict(_parts)


def collect() -> dict[str, dict[str, object]]:
    return {name: dict(part.provider()) for name, part in parts().items()}
