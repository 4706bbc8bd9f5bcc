"""Resume cursors: where a connection stands in `usage.alerts`, `notifications` and
`apikey.events`.

A user's messages of each topic live in one partition (the key is `user_id`), so a position
is three (partition, next offset) pairs. The text form is opaque to clients:
``2.<alerts p>.<offset>.<notifications p>.<offset>.<apikey.events p>.<offset>``.
Version 1 (``1.<alerts p>.<offset>.<notifications p>.<offset>``, written before API-key
updates were resumable) still decodes: it has no API-key position (`api_keys_partition` -1),
so a resume from it replays alerts and notifications and API-key updates only from the
moment the new socket registered, as version 1 promised.
A forged cursor cannot leak anything: replay reads only the authenticated user's key.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = "2"
NO_POSITION = -1  # a version-1 cursor's API-key partition and offset


class BadCursor(ValueError):
    """The text is not a cursor this bridge wrote."""


@dataclass(frozen=True, slots=True)
class Cursor:
    alerts_partition: int
    alerts_offset: int
    notifications_partition: int
    notifications_offset: int
    api_keys_partition: int = NO_POSITION
    api_keys_offset: int = NO_POSITION

    @property
    def has_api_keys(self) -> bool:
        """False for a version-1 cursor: it says nothing about API-key updates."""
        return self.api_keys_partition != NO_POSITION

    def partitions(self) -> tuple[int, int, int]:
        return self.alerts_partition, self.notifications_partition, self.api_keys_partition

    def encode(self) -> str:
        return encode(
            self.alerts_partition,
            self.alerts_offset,
            self.notifications_partition,
            self.notifications_offset,
            self.api_keys_partition,
            self.api_keys_offset,
        )


def encode(alerts_partition: int, alerts_offset: int, notes_partition: int, notes_offset: int,
           keys_partition: int, keys_offset: int) -> str:
    return (f"{VERSION}.{alerts_partition}.{alerts_offset}.{notes_partition}.{notes_offset}"
            f".{keys_partition}.{keys_offset}")


def decode(text: str) -> Cursor:
    """A version-2 cursor, or a version-1 one (without an API-key position)."""
    parts = text.split(".")
    if not ((len(parts) == 7 and parts[0] == VERSION) or (len(parts) == 5 and parts[0] == "1")):
        msg = "not a cursor"
        raise BadCursor(msg)
    if not all(p.isdigit() and p.isascii() for p in parts[1:]):
        msg = "not a cursor"
        raise BadCursor(msg)
    numbers = [int(p) for p in parts[1:]]
    if max(numbers[0::2]) > 65_535 or max(numbers[1::2]) >= 2**63:
        msg = "cursor out of range"
        raise BadCursor(msg)
    return Cursor(*numbers)
