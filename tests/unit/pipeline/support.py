"""Helpers for driving one PartitionProcessor by hand: events, batches, verdicts."""

from __future__ import annotations

import json
from typing import Any

from pipeline.items import PartitionOutput, SourceBatch
from pipeline.metrics import PipelineMetrics
from pipeline.processor import PartitionProcessor, ProcessorConfig
from pipeline.rows import EVENT_ROW_COLUMNS

T = 1_700_000_000_000  # a 10 s window boundary (20 s past a minute)
WALL = T + 60_000  # a source clock a minute past T: events around T are admitted


def event(eid: str, ts: int, user: str = "u1", service: str = "openai", status: int = 200,
          latency: float = 10.0, **extra: Any) -> bytes:
    return json.dumps({"event_id": eid, "ts": ts, "user_id": user, "api_key_id": "k1",
                       "service": service, "status_code": status, "latency_ms": latency,
                       **extra}).encode()


class Driver:
    """A processor fed batch by batch, with its own metrics; offsets count up."""

    def __init__(self, config: ProcessorConfig | None = None, resume: bytes | None = None,
                 run_id: str = "run") -> None:
        self.config = config or ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5)
        self.metrics = PipelineMetrics()
        self.processor = PartitionProcessor(self.config, resume, metrics=self.metrics,
                                            run_id=run_id)
        self.offset = 0

    def send(self, *values: bytes | None, wall: int = WALL, caught_up: bool = False,
             key: bytes | None = None) -> PartitionOutput:
        records = []
        for value in values:
            user = json.loads(value)["user_id"].encode() if value and value[:1] == b"{" else None
            records.append((self.offset, key or user, value))
            self.offset += 1
        (out,), _ = self.processor.on_batch([SourceBatch(0, records, wall, caught_up)])
        return out

    def restart(self, run_id: str = "after-restart") -> Driver:
        resumed = Driver(self.config, self.processor.snapshot(), run_id)
        resumed.offset = self.offset
        return resumed


def rows_of(out: PartitionOutput) -> list[dict[str, Any]]:
    """The usage_events_rows rows of one output, by column name."""
    return [dict(zip(EVENT_ROW_COLUMNS, json.loads(line), strict=True))
            for chunk in out.event_rows for line in chunk.data.splitlines()]


def reasons(out: PartitionOutput) -> list[str]:
    """The dead letters' reasons, by name (the part before the first colon)."""
    return [d.reason.split(":", maxsplit=1)[0] for d in out.dead_letters]
