"""A process-wide registry of metric providers, read by `/metrics` and system stats.

Each part registers a callable returning a flat dict of numbers (`register("pipeline",
METRICS.snapshot)`); readers call `collect()`. Nothing here imports a part, so the API can
show the pipeline's and the bridge's counters without importing either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

Provider = Callable[[], Mapping[str, object]]

_lock = threading.Lock()
_providers: dict[str, Provider] = {}


def register(name: str, provider: Provider) -> None:
    with _lock:
        _providers[name] = provider


def unregister(name: str) -> None:
    with _lock:
        _providers.pop(name, None)


def collect() -> dict[str, dict[str, object]]:
    with _lock:
        providers = dict(_providers)
    return {name: dict(provider()) for name, provider in providers.items()}


def prometheus_text(groups: Mapping[str, Mapping[str, object]]) -> str:
    """Numbers as Prometheus text exposition: `keypulse_<group>_<name> <value>`."""
    lines = []
    for group, values in sorted(groups.items()):
        for name, value in sorted(values.items()):
            if isinstance(value, int | float):  # bool is an int: True → 1
                lines.append(f"keypulse_{group}_{name} {float(value):g}")
    return "\n".join(lines) + "\n"
