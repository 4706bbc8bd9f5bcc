"""Usage event, schema_version 1 (DESIGN §1), and its fast decoder.

`decode_event(raw)` turns Kafka bytes into a validated `UsageEvent` or raises
`InvalidEvent` whose `reason` names the field and the rule it broke, e.g.
``status_code: expected `int` <= 599``. Unknown fields are ignored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
# ts must fall in [2000-01-01, 2100-01-01): catches seconds-for-milliseconds mistakes.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class UsageEvent(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One call made with a managed API key."""

    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ts: AwareDatetime | int | float
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    api_key_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    service: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    status_code: Annotated[int, msgspec.Meta(ge=100, le=599)]
    latency_ms: Annotated[float, msgspec.Meta(ge=0, le=3_600_000)]
    endpoint: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    method: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{1,16}$")] | None = None
    tokens_in: NonNegInt | None = None
    tokens_out: NonNegInt | None = None
    cost_usd: NonNegFloat | None = None
    request_bytes: NonNegInt | None = None
    response_bytes: NonNegInt | None = None
    error_type: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    region: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    sdk: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def ts_ms(self) -> int:
        """Event time as epoch milliseconds (validated by decode_event)."""
        ts = self.ts
        if isinstance(ts, datetime):
            return int(ts.timestamp() * 1000)
        return int(ts)

    @property
    def is_success(self) -> bool:
        return self.status_code < 400


class InvalidEvent(ValueError):  # noqa: N818 - reads as "raise InvalidEvent(reason)"
    """The bytes are not a valid usage event; `reason` says which field broke which rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_decoder = msgspec.json.Decoder(UsageEvent)
_encoder = msgspec.json.Encoder()


def decode_event(raw: bytes | bytearray | memoryview | str) -> UsageEvent:
    """Bytes → validated event, or InvalidEvent with a precise reason."""
    if len(raw) > MAX_EVENT_BYTES:
        msg = f"event: {len(raw)} bytes exceeds the {MAX_EVENT_BYTES} byte limit"
        raise InvalidEvent(msg)
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(_reason(str(exc))) from None
    except msgspec.DecodeError as exc:
        msg = f"event: not valid JSON ({exc})"
        raise InvalidEvent(msg) from None
    except UnicodeDecodeError as exc:
        msg = f"event: invalid UTF-8 at byte {exc.start}"
        raise InvalidEvent(msg) from None
    except RecursionError:
        msg = "event: nested too deeply"
        raise InvalidEvent(msg) from None
    ts = event.ts
    if not isinstance(ts, datetime):
        if ts != ts or ts in (float("inf"), float("-inf")):  # pragma: no cover - JSON has no NaN
            msg = "ts: must be a finite number"
            raise InvalidEvent(msg)
        if not MIN_TS_MS <= ts < MAX_TS_MS:
            msg = f"ts: epoch milliseconds must be in [{MIN_TS_MS}, {MAX_TS_MS}), got {ts!r}"
            raise InvalidEvent(msg)
    elif not MIN_TS_MS <= ts.timestamp() * 1000 < MAX_TS_MS:
        msg = f"ts: must be between 2000-01-01 and 2100-01-01, got {ts.isoformat()}"
        raise InvalidEvent(msg)
    if event.schema_version != SCHEMA_VERSION:
        msg = f"schema_version: unsupported version {event.schema_version} (supported: 1)"
        raise InvalidEvent(msg)
    return event


def encode_event(event: UsageEvent) -> bytes:
    return _encoder.encode(event)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _reason(message: str) -> str:
    """msgspec's "Expected `int` <= 599 - at `$.status_code`" → "status_code: expected `int` <= 599"."""
    text, sep, path = message.rpartition(" - at `")
    if not sep:
        text, path = message, "$"
    field = path.rstrip("`").removeprefix("$").lstrip(".")
    if text.startswith("Object missing required field"):
        missing = text.rpartition("`")[0].rpartition("`")[2]
        return f"{field + '.' if field else ''}{missing}: required field missing"
    return f"{field or 'event'}: {text[:1].lower()}{text[1:]}"
