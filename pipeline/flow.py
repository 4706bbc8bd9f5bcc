"""`build_flow`: the dataflow, given its sources and sink (tests pass in-memory ones).

    events ─▶ key by partition ─▶ process (per partition: dedup, windows, alerts) ─┬▶ sink
    alert.rules ─▶ decode ─▶ broadcast to every partition ─┘                      │
               └▶ alert_rules rows (keyed by rule_id) ──────────────────────────────┤
    incident signals, populations (keyed by service) ─▶ provider_incident notes ──┤
    notifications, apikey.events ─▶ decode, check owner ─▶ records to store ───────┘

Items are whole poll batches (`SourceBatch`), so the per-item cost of the dataflow is paid
once per batch, not once per event.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.outputs import Sink

from core.outputs import rule_row
from core.templates import Templates
from pipeline.alerting.incidents import IncidentConfig, IncidentCounter, IncidentInput
from pipeline.alerting.rules import InvalidRuleMessage, RuleChange, decode_rule_message
from pipeline.items import PartitionOutput, RuleUpdates, SourceBatch, TopicBatch
from pipeline.processor import HookFactory, PartitionProcessor, ProcessorConfig
from pipeline.records import records_output
from schemas.alerts import AlertRule
from schemas.notifications import Notification

logger = logging.getLogger(__name__)

Keyed = tuple[str, PartitionOutput]


def build_flow(
    events: Source[SourceBatch],
    sink: Sink[Keyed],
    config: ProcessorConfig,
    *,
    partitions: list[int],
    rules: Source[SourceBatch] | None = None,
    hook_factory: HookFactory | None = None,
    incidents: IncidentConfig | None = None,
    templates: Templates | None = None,
    records: Source[TopicBatch] | None = None,
    flow_id: str = "keypulse",
) -> Dataflow:
    """The keypulse dataflow. `partitions` lists the event topic's partitions, so rule
    changes can be broadcast to each partition's processor. `hook_factory` (alerting)
    turns closed windows into alerts; with it, incident signals from every partition
    meet in one step keyed by service, configured by `incidents` (give the hooks the same
    one: `AlertingHook.factory(incidents=...)`, since they decide which users are trusted);
    `templates` word the provider-incident notifications (default: the packaged registry).
    `records` (notifications and apikey.events, pipeline/records.py) are checked and stored
    by the sink's first writer, like rule rows; refused ones are logged and counted."""
    flow = Dataflow(flow_id)
    batches = op.input("events", flow, events)
    keyed = op.key_on("by_partition", batches, lambda batch: str(batch.partition))
    extra_outputs: list[Stream[Keyed]] = []
    if rules is not None:
        updates = op.filter_map("decode_rules", op.input("rules", flow, rules), decode_rules)
        keys = [str(p) for p in partitions]
        broadcast = op.flat_map("broadcast_rules", updates, lambda u: [(k, u) for k in keys])
        keyed = op.merge("with_rules", keyed, broadcast)
        by_rule = op.flat_map(
            "rule_changes", updates, lambda u: [(c.rule_id, c) for c in u.changes]
        )
        rule_rows = op.stateful_map("rule_rows", by_rule, rule_row_mapper)
        extra_outputs.append(op.filter_map("rule_out", rule_rows, _rule_output))
    if records is not None:
        skew = config.max_clock_skew_seconds

        def to_store(item: TopicBatch) -> Keyed | None:
            out = records_output(item, max_skew_seconds=skew)
            return None if out is None else ("0", out)  # the sink's first writer

        extra_outputs.append(
            op.filter_map("platform_records", op.input("records", flow, records), to_store))

    def builder(resume: bytes | None) -> PartitionProcessor:
        return PartitionProcessor(config, resume, hook_factory)

    outputs: Stream[Keyed] = op.stateful_batch("process", keyed, builder)
    if hook_factory is not None:
        signals = op.flat_map(
            "incident_signals", outputs, lambda kv: [(s.service, s) for s in kv[1].signals]
        )
        counter_config = incidents or IncidentConfig()

        def count(
            state: IncidentCounter | None, item: IncidentInput
        ) -> tuple[IncidentCounter | None, Notification | None]:
            counter = state if state is not None else IncidentCounter(counter_config)
            counter.config = counter_config  # configuration, not state: the running one
            counter.templates = templates
            note = counter.on_item(item)
            # A service nobody trusted is active on holds nothing worth keeping: returning
            # None makes Bytewax forget the key, so made-up services leave no state behind.
            return (None if counter.is_empty() else counter), note

        notes = op.stateful_map("incidents", signals, count)
        extra_outputs.append(op.filter_map("incident_out", notes, _notification_output))
    if extra_outputs:
        outputs = op.merge("outputs", outputs, *extra_outputs)
    op.output("sink", outputs, sink)
    return flow


def decode_rules(batch: SourceBatch) -> RuleUpdates | None:
    """A poll batch of `alert.rules` → decoded changes (invalid ones logged and skipped)."""
    changes = []
    for offset, key, value in batch.records:
        try:
            changes.append(decode_rule_message(key, value or None))
        except InvalidRuleMessage as exc:
            logger.warning("alert.rules offset %s ignored: %s", offset, exc)
    return RuleUpdates(changes) if changes else None


def rule_row_mapper(
    state: AlertRule | None, change: RuleChange
) -> tuple[AlertRule | None, tuple[Any, ...] | None]:
    """Keyed by rule_id: remembers the rule so a tombstone can name its owner."""
    now_ms = int(time.time() * 1000)
    if change.rule is not None:
        return change.rule, rule_row(change.rule, deleted=False, updated_ms=now_ms)
    if state is None:
        return None, None
    return None, rule_row(state, deleted=True, updated_ms=now_ms)


def _rule_output(item: tuple[str, tuple[Any, ...] | None]) -> Keyed | None:
    if item[1] is None:
        return None
    out = PartitionOutput.empty()
    out.rule_rows.append(item[1])
    return "0", out  # the sink's first writer


def _notification_output(item: tuple[str, Notification | None]) -> Keyed | None:
    if item[1] is None:
        return None
    out = PartitionOutput.empty()
    out.notifications.append(item[1])
    return "0", out
