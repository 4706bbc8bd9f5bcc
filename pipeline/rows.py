"""Pure mappings from messages to ClickHouse rows (snuba's `process_message` shape).

The columns are declared once, with their table and topic, in core.outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from core.outputs import ALERT_RULES_OUTPUT, EVENT_ROWS_OUTPUT

# A `usage_events_rows` row: the validated event's fields in declaration order
# (msgspec.structs.astuple), then the pipeline's columns. The processor builds it as
# `astuple(event) + (ts_ms, late, partition, offset, ingested_ms)`. Re-encoded from validated
# fields, ClickHouse stores exactly what the windows counted, whatever form the SDK sent.
EVENT_ROW_COLUMNS = EVENT_ROWS_OUTPUT.columns

# One row → one JSON array appended to a buffer: `encode_row_into(row, buffer, -1)`. The
# processor appends each row as it goes, while the event is still in the CPU's cache, into
# one growing buffer per poll batch (a bytes object per row cost an allocation and resizes).
encode_row_into = msgspec.json.Encoder().encode_into


def encode_rows(rows: Iterable[tuple[Any, ...]]) -> bytes:
    """JSONCompactEachRow text: one array per line."""
    buffer = bytearray()
    for row in rows:
        encode_row_into(row, buffer, -1)
        buffer.append(0x0A)
    return bytes(buffer)


RULE_COLUMNS = ALERT_RULES_OUTPUT.columns
