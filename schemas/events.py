"""Usage event, schema_version 1 (DESIGN §1), and its fast decoder.

`decode_event(raw)` turns Kafka bytes into a validated `UsageEvent` or raises
`InvalidEvent` whose `reason` names the field and the rule it broke, e.g.
``status_code: expected `int` <= 599``. Unknown fields are ignored.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

import msgspec

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
# ts must fall in [2000-01-01, 2100-01-01): catches seconds-for-milliseconds mistakes.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000

_MIN_TS = datetime.fromtimestamp(MIN_TS_MS / 1000, tz=UTC)
_MAX_TS = datetime.fromtimestamp(MAX_TS_MS / 1000, tz=UTC)

SERVICE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
METHOD_PATTERN = r"^[A-Za-z]{1,16}$"
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class UsageEvent(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One call made with a managed API key."""

    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ts: AwareDatetime | int | float
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    api_key_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    # Patterns are checked after decoding against a cache of names already seen
    # (`_check_names`): msgspec's per-event regex call was 15 % of the pipeline's CPU.
    service: Annotated[str, msgspec.Meta(extra_json_schema={"pattern": SERVICE_PATTERN})]
    status_code: Annotated[int, msgspec.Meta(ge=100, le=599)]
    latency_ms: Annotated[float, msgspec.Meta(ge=0, le=3_600_000)]
    endpoint: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    method: (
        Annotated[str, msgspec.Meta(extra_json_schema={"pattern": METHOD_PATTERN})] | None
    ) = None
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


class InvalidEvent(ValueError):  # named for how it reads: raise InvalidEvent(reason)
    """The bytes are not a valid usage event; `reason` says which field broke which rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_decoder = msgspec.json.Decoder(UsageEvent)
_encoder = msgspec.json.Encoder()


def decode_event(raw: bytes | bytearray | memoryview | str) -> UsageEvent:
    """Bytes → validated event, or InvalidEvent with a precise reason."""
    if type(raw) is not bytes:
        raw = _as_bytes(raw)
    if len(raw) > MAX_EVENT_BYTES:
        msg = f"event: {len(raw)} bytes exceeds the {MAX_EVENT_BYTES} byte limit"
        raise InvalidEvent(msg)
    if not raw.isascii():
        # msgspec checks UTF-8 only inside the strings it keeps, so invalid bytes in an
        # unknown field or a key would slip through; JSON text must be UTF-8 throughout.
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            raise InvalidEvent(_utf8_reason(raw, exc.start)) from None
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(_reason(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(_json_reason(raw, str(exc))) from None
    except RecursionError:
        msg = "event: nested too deeply"
        raise InvalidEvent(msg) from None
    ts = event.ts
    if not isinstance(ts, datetime):
        # JSON has no NaN/Infinity and msgspec rejects 1e400; the range check would catch both.
        if not MIN_TS_MS <= ts < MAX_TS_MS:
            msg = f"ts: epoch milliseconds must be in [{MIN_TS_MS}, {MAX_TS_MS}), got {ts!r}"
            raise InvalidEvent(msg)
    elif not _MIN_TS <= ts < _MAX_TS:  # aware datetimes compare as instants (no timestamp())
        msg = f"ts: must be between 2000-01-01 and 2100-01-01, got {ts.isoformat()}"
        raise InvalidEvent(msg)
    if event.schema_version != SCHEMA_VERSION:
        msg = f"schema_version: unsupported version {event.schema_version} (supported: 1)"
        raise InvalidEvent(msg)
    if event.service not in _known_services or (
        event.method is not None and event.method not in _known_methods
    ):
        _check_names(event)
    return event


_SERVICE_RE = re.compile(SERVICE_PATTERN)
_METHOD_RE = re.compile(METHOD_PATTERN)
_known_services: set[str] = set()
_known_methods: set[str] = set()
_KNOWN_MAX = 10_000


def _check_names(event: UsageEvent) -> None:
    """The pattern rules of `service` and `method`; valid names are remembered."""
    for field, value, pattern, known in (
        ("service", event.service, _SERVICE_RE, _known_services),
        ("method", event.method, _METHOD_RE, _known_methods),
    ):
        if value is None or value in known:
            continue
        if not pattern.fullmatch(value):
            msg = f"{field}: expected `str` matching regex {pattern.pattern!r}"
            raise InvalidEvent(msg)
        if len(known) >= _KNOWN_MAX:
            known.clear()
        known.add(value)


def _as_bytes(raw: bytes | bytearray | memoryview | str) -> bytes:
    """str (UTF-8 encoded) or any buffer (bytearray, memoryview, msgspec.Raw) as bytes."""
    if isinstance(raw, str):
        try:
            return raw.encode()
        except UnicodeEncodeError as exc:
            msg = f"event: invalid Unicode (lone surrogate at character {exc.start})"
            raise InvalidEvent(msg) from None
    return bytes(raw)


def encode_event(event: UsageEvent) -> bytes:
    return _encoder.encode(event)


# Event-time admission (DESIGN §1), shared by the pipeline and `POST /v1/events`: an event more
# than max_clock_skew_seconds ahead of the time it is read, or older than events_ttl_days, is
# refused with one of these reasons.
TS_IN_FUTURE = "ts_in_future"
TS_BEYOND_RETENTION = "ts_beyond_retention"
_DAY_MS = 86_400_000


def ts_bounds(wall_ms: int, max_clock_skew_seconds: int, events_ttl_days: int) -> tuple[int, int]:
    """The admitted event times `(oldest_ms, newest_ms)`, inclusive, at wall time `wall_ms`."""
    return wall_ms - events_ttl_days * _DAY_MS, wall_ms + max_clock_skew_seconds * 1000


def ts_reason(ts_ms: int, wall_ms: int, max_clock_skew_seconds: int, events_ttl_days: int) -> str:
    """Why an event's time (already found outside `ts_bounds`) is not admitted."""
    if ts_ms > wall_ms:
        return (f"{TS_IN_FUTURE}: {ts_ms - wall_ms} ms ahead of the time it was read "
                f"(max_clock_skew_seconds = {max_clock_skew_seconds})")
    return (f"{TS_BEYOND_RETENTION}: {(wall_ms - ts_ms) // _DAY_MS} days old, older than the "
            f"raw events' retention (events_ttl_days = {events_ttl_days})")


# The reasons msgspec gives for `ts`, in words an SDK author can act on.
_TS_REASONS = {
    "Expected `int | float | datetime`": "expected an RFC 3339 string or epoch milliseconds",
    "Expected `datetime` with a timezone component":
        "RFC 3339 time needs an offset (Z or ±hh:mm)",
    "Invalid RFC3339 encoded datetime": "not an RFC 3339 date-time (e.g. 2024-05-01T12:00:00Z)",
}
# The key whose value starts at the end of the text: `..."tokens_in": ` or `..."user_id":"ab`.
_KEY_BEFORE_VALUE = re.compile(rb'"((?:[^"\\]|\\.){1,128})"\s*:\s*$')
_KEY_BEFORE_STRING = re.compile(rb'"((?:[^"\\]|\\.){1,128})"\s*:\s*"(?:[^"\\]|\\.)*$')
_NON_FINITE = re.compile(rb"-?(?:NaN|Infinity)")
_AT_BYTE = re.compile(r"\(byte (\d+)\)$")
# A high surrogate escape (\uD800-\uDBFF) not followed by a low one (\uDC00-\uDFFF), or a low
# one alone: valid JSON syntax but not Unicode text; msgspec then says "truncated".
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _reason(message: str) -> str:
    """msgspec's message → "field: rule".

    "Expected `int` <= 599 - at `$.status_code`" → "status_code: expected `int` <= 599".
    """
    text, sep, path = message.rpartition(" - at `")
    if not sep:
        text, path = message, "$"
    field = path.rstrip("`").removeprefix("$").lstrip(".")
    if text.startswith("Object missing required field"):
        missing = text.rpartition("`")[0].rpartition("`")[2]
        return f"{field + '.' if field else ''}{missing}: required field missing"
    if field == "ts":
        for prefix, words in _TS_REASONS.items():
            if text.startswith(prefix):
                return f"ts: {words}{text[len(prefix):]}"
    return f"{field or 'event'}: {text[:1].lower()}{text[1:]}"


def _json_reason(raw: bytes | bytearray, message: str) -> str:
    """A JSON syntax error; NaN and Infinity, which some encoders emit, are named."""
    at = _AT_BYTE.search(message)
    if at:
        pos = int(at.group(1))
        for start in (pos - 1, pos):
            token = _NON_FINITE.match(raw, max(start, 0))
            if token:
                key = _KEY_BEFORE_VALUE.search(raw, max(0, token.start() - 256), token.start())
                field = key.group(1).decode(errors="replace") if key else "event"
                return (f"{field}: {token.group().decode()} is not valid JSON "
                        f"(numbers must be finite; byte {token.start()})")
    if "surrogate" in message or "escape" in message or "truncated" in message:
        lone = _LONE_SURROGATE.search(raw)
        if lone:
            key = _KEY_BEFORE_STRING.search(raw, max(0, lone.start() - 1024), lone.start())
            field = key.group(1).decode(errors="replace") if key else "event"
            return (f"{field}: {lone.group().decode()} is a lone UTF-16 surrogate, not text "
                    f"(byte {lone.start()})")
    return f"event: not valid JSON ({message})"


def _utf8_reason(raw: bytes | bytearray, pos: int) -> str:
    key = _KEY_BEFORE_STRING.search(raw, max(0, pos - 1024), pos)
    field = key.group(1).decode(errors="replace") if key else "event"
    return f"{field}: invalid UTF-8 at byte {pos}"
