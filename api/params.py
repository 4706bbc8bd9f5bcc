"""Query parameters every read route shares: times, ranges, intervals and cursors (DESIGN §8).

    Instant           a `from`/`to` value: RFC 3339 with an offset, or epoch milliseconds
    parse_instant(v)  → epoch ms; APIError 400 (`field`) when it is neither
    TimeRange.of(...) `[from, to)` checked (`to > from`, at most `max_days`); defaults: the last
                      24 h up to now
    Interval          10s, 1m, 1h, 1d: the stats windows or a rollup
    encode_cursor / decode_cursor
                      an opaque, URL-safe cursor for keyset pagination; a tampered or foreign
                      cursor is a 400, never a 500

Every problem is an `APIError(400, "invalid_request", message, field=name)`, so a client
learns which parameter to fix.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from fastapi import Query

from api.errors import APIError

DAY_MS = 86_400_000
MAX_RANGE_DAYS = 400  # the longest range a read route accepts (the 1 h rollups' retention)

InstantQuery = Annotated[
    str | None,
    Query(description="RFC 3339 with an offset (2026-12-01T12:00:00Z) or epoch milliseconds",
          examples=["2026-12-01T12:00:00Z"], max_length=64),
]
# `from` and `to` of a range, each with its own example so that the document's examples make a
# valid range.
FromQuery = Annotated[InstantQuery, Query(alias="from", examples=["2026-12-01T00:00:00Z"])]
ToQuery = Annotated[InstantQuery, Query(examples=["2026-12-02T00:00:00Z"])]


def bad(message: str, field: str) -> APIError:
    return APIError(400, "invalid_request", message, field=field)


def parse_instant(value: str, field: str) -> int:
    """`value` as epoch milliseconds: an integer, or RFC 3339 with an offset."""
    text = value.strip()
    if text.lstrip("-").isdigit():
        ms = int(text)
    else:
        try:
            parsed = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            msg = (f"{field}: expected RFC 3339 (2026-12-01T12:00:00Z) or epoch milliseconds, "
                   f"got {value[:64]!r}")
            raise bad(msg, field) from None
        if parsed.tzinfo is None:
            msg = f"{field}: an RFC 3339 time needs an offset (Z or ±hh:mm)"
            raise bad(msg, field)
        ms = int(parsed.timestamp() * 1000)
    if not 0 <= ms < 253_402_300_800_000:  # 1970 .. 9999
        msg = f"{field}: out of range (1970-01-01 to 9999-12-31)"
        raise bad(msg, field)
    return ms


def iso(ms: int) -> str:
    """Epoch ms as RFC 3339 UTC with milliseconds, as answers show times."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class TimeRange:
    """`[from_ms, to_ms)`, validated."""

    from_ms: int
    to_ms: int

    @classmethod
    def of(cls, from_: str | None, to: str | None, now_ms: int, *,
           default_ms: int = DAY_MS, max_days: int = MAX_RANGE_DAYS) -> TimeRange:
        """From the `from`/`to` parameters; a missing `to` is now, a missing `from` is
        `default_ms` before `to`."""
        to_ms = parse_instant(to, "to") if to is not None else now_ms
        from_ms = parse_instant(from_, "from") if from_ is not None else max(0, to_ms - default_ms)
        _check_order(from_ms, to_ms)
        if to_ms - from_ms > max_days * DAY_MS:
            msg = f"from: a range spans at most {max_days} days"
            raise bad(msg, "from")
        return cls(from_ms, to_ms)


def open_range(from_: str | None, to: str | None) -> tuple[int | None, int | None]:
    """`[from, to)` in epoch ms where either end may be absent (unbounded): history lists
    that default to everything."""
    from_ms = None if from_ is None else parse_instant(from_, "from")
    to_ms = None if to is None else parse_instant(to, "to")
    if from_ms is not None and to_ms is not None:
        _check_order(from_ms, to_ms)
    return from_ms, to_ms


def _check_order(from_ms: int, to_ms: int) -> None:
    if to_ms <= from_ms:
        msg = "to: must be after from (ranges are [from, to))"
        raise bad(msg, "to")


class Interval(enum.StrEnum):
    """A time series' step: the stats windows (10 s) or a rollup."""

    S10 = "10s"
    M1 = "1m"
    H1 = "1h"
    D1 = "1d"

    @property
    def ms(self) -> int:
        return {"10s": 10_000, "1m": 60_000, "1h": 3_600_000, "1d": DAY_MS}[self.value]


def encode_cursor(position: Any) -> str:
    """A keyset position (JSON-encodable: a list of ints and strings) as an opaque cursor."""
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


def decode_cursor(cursor: str, kind: type[Any], field: str = "cursor") -> Any:
    """The position an `encode_cursor` made, checked against `kind` (e.g. tuple[int, str])."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return msgspec.json.decode(raw, type=kind)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        msg = f"{field}: not a cursor this route returned"
        raise bad(msg, field) from None
