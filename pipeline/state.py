"""The processor's snapshot layout, versioned: `STATE_VERSION` and one `upgrade()`.

A snapshot is plain data (no pipeline classes pickled), so a class may change shape without
breaking a resume:

    {"version": 2, "partition": int,
     "watermark": (value, max_event_ms, last_wall_ms, caught_up, run_id),
     "dedup": Deduplicator.snapshot(),  # ids, or the position of their log
     "windows": {start_ms: {(user_id, service): (cost_usd, latencies, statuses, tokens_in,
                                                  tokens_out)}},
     "hook": the alerting hook's own state, "unevaluated": (stats, watermark_ms) | None}

`upgrade()` turns a snapshot of any earlier release into that layout: the one place that
knows older layouts. The processor reads only the current one.
"""

from __future__ import annotations

import io
import pickle
from array import array
from typing import Any

# 2: plain data with a version (watermark and accumulators as tuples). 1: every snapshot
# written before versions existed (the Watermark and WindowAcc objects pickled whole; the
# first releases also kept dedup ids as pickled "blobs", counts instead of statuses in the
# accumulators, and no "unevaluated").
STATE_VERSION = 2


class _Pickled:
    """An object of a class that older snapshots pickled whole, read as its raw pickled
    state for `upgrade` to convert: those classes may since have changed shape."""

    state: Any

    def __setstate__(self, state: Any) -> None:
        self.state = state


_PICKLED_WHOLE = {("pipeline.windows", "Watermark"), ("pipeline.windows", "WindowAcc")}


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLED_WHOLE:
            return _Pickled
        return super().find_class(module, name)


def load_state(blob: bytes) -> dict[str, Any]:
    """A snapshot's dict, of whichever version (pass it to `upgrade`)."""
    state: dict[str, Any] = _StateUnpickler(io.BytesIO(blob)).load()
    return state


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """Any earlier snapshot dict → the layout of `STATE_VERSION`. The one place that knows
    older layouts: the processor reads only the current one."""
    version = state.get("version", 1)
    if version > STATE_VERSION:
        msg = (f"this snapshot has state version {version}, newer than this keypulse's "
               f"{STATE_VERSION}: resume it with the release that wrote it")
        raise RuntimeError(msg)
    if version == 1:
        state = _from_version_1(state)
    return state


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    slots = state["watermark"].state[1]  # (None, {slot: value}): __slots__, no __getstate__
    dedup = dict(state["dedup"])
    if "blobs" in dedup:  # pickled chunks of ids, keyed (bucket, chunk)
        buckets: dict[int, list[str]] = {}
        for (bucket, _chunk), blob in sorted(dedup.pop("blobs").items()):
            buckets.setdefault(bucket, []).extend(pickle.loads(blob))
        dedup["buckets"] = buckets
    return {
        "version": STATE_VERSION,
        "partition": state["partition"],
        "watermark": (slots["value"], slots["max_event_ms"], slots["last_wall_ms"],
                      slots["caught_up"], slots["run_id"]),
        "dedup": dedup,
        "windows": {start: {key: _acc_from_version_1(acc.state) for key, acc in accs.items()}
                    for start, accs in state["windows"].items()},
        "hook": state["hook"],
        "unevaluated": state.get("unevaluated"),
    }


def _acc_from_version_1(state: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(state) == 5:  # (cost_usd, latencies, statuses, tokens_in, tokens_out)
        return state
    # The first releases kept counts: statuses that count the same stand in for them.
    (client, cost_usd, latencies, _max, _sum, server, ok, tokens_in, tokens_out) = state
    statuses = array("H", [200] * ok + [400] * client + [500] * server)
    return (cost_usd, latencies, statuses, tokens_in, tokens_out)
