"""`build_flow`: the dataflow, given its sources and sink (tests pass in-memory ones).

    events source ─▶ key by partition ─▶ process (stateful per partition) ─▶ output sink
    rules source ──▶ broadcast to every partition ─┘

Items are whole poll batches (`SourceBatch`), so the per-item cost of the dataflow is paid
once per batch, not once per event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from pipeline.items import PartitionOutput, SourceBatch
from pipeline.processor import PartitionProcessor, ProcessorConfig, WindowHook

HookFactory = Callable[[Any], WindowHook]  # resumed hook state (or None) → hook


def build_flow(
    events: Source[SourceBatch],
    sink: Sink[tuple[str, PartitionOutput]],
    config: ProcessorConfig,
    *,
    partitions: list[int],
    control: Source[Any] | None = None,
    hook_factory: HookFactory | None = None,
    flow_id: str = "keypulse",
) -> Dataflow:
    """The keypulse dataflow. `partitions` lists the event topic's partitions, so control
    items (alert rules) can be broadcast to each partition's processor."""
    flow = Dataflow(flow_id)
    batches = op.input("events", flow, events)
    keyed = op.key_on("by_partition", batches, lambda batch: str(batch.partition))
    if control is not None:
        controls = op.input("control", flow, control)
        keys = [str(p) for p in partitions]
        broadcast = op.flat_map("broadcast", controls, lambda item: [(k, item) for k in keys])
        keyed = op.merge("with_control", keyed, broadcast)

    def builder(resume: bytes | None) -> PartitionProcessor:
        processor = PartitionProcessor(config, resume)
        if hook_factory is not None:
            processor.hook = hook_factory(processor.hook_state)
        return processor

    outputs = op.stateful_batch("process", keyed, builder)
    op.output("sink", outputs, sink)
    return flow
