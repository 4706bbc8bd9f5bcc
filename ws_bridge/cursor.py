"""Resume cursors: where a connection stands in `usage.alerts` and `notifications`.

A user's alerts and notifications each live in one partition (the key is `user_id`), so a
position is two (partition, next offset) pairs. The text form is opaque to clients:
``1.<alerts partition>.<alerts offset>.<notifications partition>.<notifications offset>``.
A forged cursor cannot leak anything: replay reads only the authenticated user's key.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = "1"


class BadCursor(ValueError):
    """The text is not a cursor this bridge wrote."""


@dataclass(frozen=True, slots=True)
class Cursor:
    alerts_partition: int
    alerts_offset: int
    notifications_partition: int
    notifications_offset: int

    def encode(self) -> str:
        return encode(
            self.alerts_partition,
            self.alerts_offset,
            self.notifications_partition,
            self.notifications_offset,
        )


def encode(alerts_partition: int, alerts_offset: int, notes_partition: int,
           notes_offset: int) -> str:
    return f"{VERSION}.{alerts_partition}.{alerts_offset}.{notes_partition}.{notes_offset}"


def decode(text: str) -> Cursor:
    parts = text.split(".")
    if len(parts) != 5 or parts[0] != VERSION or not all(p.isdigit() for p in parts[1:]):
        msg = "not a cursor"
        raise BadCursor(msg)
    a_p, a_o, n_p, n_o = (int(p) for p in parts[1:])
    if max(a_p, n_p) > 65_535 or max(a_o, n_o) >= 2**63:
        msg = "cursor out of range"
        raise BadCursor(msg)
    return Cursor(a_p, a_o, n_p, n_o)
