"""The contract: example payloads, exported JSON Schema, and every rule of DESIGN §1.

Each example under schemas/examples/<topic>/1/ must decode with its msgspec model, carry
no key the model would silently drop, and validate against its exported JSON Schema
(`jsonschema` is a dev dependency). Each invalid example under
schemas/examples/invalid/usage.events/ is rejected by decode_event with exactly the reason in
its sibling `.reason` file, and by the JSON Schema unless it is a named gap or not JSON at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from schemas import export
from schemas.alerts import Alert, AlertRule
from schemas.api_keys import ApiKeyEvent
from schemas.audit import AuditRecord
from schemas.events import (
    MAX_EVENT_BYTES,
    MAX_TS_MS,
    MIN_TS_MS,
    InvalidEvent,
    UsageEvent,
    decode_event,
)
from schemas.notifications import (
    Notification,
    NotificationDelete,
    NotificationMessage,
    NotificationRead,
)
from schemas.stats import StatsRecord
from schemas.ws import (
    CLIENT_EVENTS,
    ClientFrame,
    decode_server_frame,
)

EXAMPLES = Path(export.__file__).resolve().parent / "examples"
INVALID = EXAMPLES / "invalid" / "usage.events"

# -- examples -----------------------------------------------------------------------------


def _decode_notification(raw: bytes) -> tuple[object, str]:
    message = msgspec.json.decode(raw, type=NotificationMessage)
    schema = {Notification: "notification", NotificationRead: "notification_read",
              NotificationDelete: "notification_delete"}[type(message)]
    return message, schema


def _decode_client_frame(raw: bytes) -> tuple[object, str]:
    frame = msgspec.json.decode(raw, type=ClientFrame)
    kind = CLIENT_EVENTS[frame.event]
    data = decode_event(frame.data) if kind is None else msgspec.json.decode(frame.data, type=kind)
    return data, "ws_client_frame"


def _decode_server_frame(raw: bytes) -> tuple[object, str]:
    return decode_server_frame(raw)[1], "ws_server_frame"


def _model(model: Any, schema: str) -> Callable[[bytes], tuple[object, str]]:
    return lambda raw: (msgspec.json.decode(raw, type=model), schema)


# topic directory → bytes → (decoded message, JSON Schema name)
DECODERS: dict[str, Callable[[bytes], tuple[object, str]]] = {
    "usage.events": lambda raw: (decode_event(raw), "usage_event"),
    "usage.stats": _model(StatsRecord, "stats_record"),
    "usage.alerts": _model(Alert, "alert"),
    "alert.rules": _model(AlertRule, "alert_rule"),
    "notifications": _decode_notification,
    "apikey.events": _model(ApiKeyEvent, "apikey_event"),
    "audit_log": _model(AuditRecord, "audit_record"),
    "ws.client": _decode_client_frame,
    "ws.server": _decode_server_frame,
}

VALID_EXAMPLES = sorted(
    p for p in EXAMPLES.glob("*/1/*.json") if p.parent.parent.name in DECODERS
)
INVALID_EXAMPLES = sorted(INVALID.glob("*.json"))

# Rules JSON Schema cannot express (decode_event enforces them): the range of an RFC 3339
# ts, the 64 KiB limit, nesting depth, Unicode validity of escapes; and JSON Schema's
# "integer" admits 200.0, which decode_event refuses for an int field.
SCHEMA_GAPS = {
    "status_code_as_float",
    "ts_rfc3339_before_2000",
    "ts_rfc3339_2100",
    "oversized_payload",
    "lone_surrogate_escape",
}
# Invalid examples that are not JSON documents (a JSON parser refuses them, Python's too), so
# there is nothing for a JSON Schema to judge; decode_event's reasons for them are checked.
NOT_JSON = {
    "deeply_nested_unknown_field",  # deeper than any parser's recursion limit
    "invalid_utf8_in_unknown_field",
    "invalid_utf8_in_user_id",
    "not_json",
    "overlong_utf8",
    "trailing_garbage",
    "truncated_json",
}
# Valid examples that show unknown fields being ignored: the only ones allowed keys the
# model does not have.
UNKNOWN_FIELD_EXAMPLES = {"usage.events/optional_nulls_and_unknown_fields"}


def _example_id(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.stem}"


def _model_keys(message: object) -> set[str]:
    """The JSON keys `type(message)` decodes: its fields' names on the wire, and its tag."""
    model = type(message)
    keys = {field.encode_name for field in msgspec.structs.fields(model)}
    tag_field = model.__struct_config__.tag_field
    return keys | {tag_field} if tag_field else keys


@pytest.fixture(scope="module")
def validators() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, data in export.render().items():
        schema = json.loads(data)
        jsonschema.Draft202012Validator.check_schema(schema)
        out[name.removesuffix(f".v{export.VERSION}.json")] = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.FormatChecker()
        )
    return out


def test_every_topic_with_a_model_has_examples() -> None:
    for topic in DECODERS:
        examples = list((EXAMPLES / topic / "1").glob("*.json"))
        assert len(examples) >= 2, topic
    assert len(list((EXAMPLES / "usage.events" / "1").glob("*.json"))) >= 4


@pytest.mark.parametrize("path", VALID_EXAMPLES, ids=_example_id)
def test_example_decodes_with_its_model_and_drops_nothing(path: Path) -> None:
    """Unknown keys are ignored by design, so a stale example would teach a dead field."""
    topic = path.parent.parent.name
    message, _ = DECODERS[topic](path.read_bytes())
    document = json.loads(path.read_bytes())
    payload = document.get("data", {}) if topic.startswith("ws.") else document  # frame's data
    unknown = set(payload) - _model_keys(message)
    if _example_id(path) in UNKNOWN_FIELD_EXAMPLES:
        assert unknown, "this example exists to show unknown fields"
    else:
        assert unknown == set(), f"{type(message).__name__} has no field for these keys"


@pytest.mark.parametrize("path", VALID_EXAMPLES, ids=_example_id)
def test_example_validates_against_its_json_schema(path: Path, validators: dict[str, Any]) -> None:
    raw = path.read_bytes()
    _, schema = DECODERS[path.parent.parent.name](raw)
    errors = [e.message for e in validators[schema].iter_errors(json.loads(raw))]
    assert errors == []


@pytest.mark.parametrize("path", INVALID_EXAMPLES, ids=lambda p: p.stem)
def test_invalid_example_is_rejected_with_its_reason(path: Path) -> None:
    expected = path.with_suffix(".reason").read_text(encoding="utf-8").strip()
    with pytest.raises(InvalidEvent) as caught:
        decode_event(path.read_bytes())
    assert caught.value.reason == expected


@pytest.mark.parametrize(
    "path", [p for p in INVALID_EXAMPLES if p.stem not in NOT_JSON], ids=lambda p: p.stem
)
def test_invalid_example_is_rejected_by_the_json_schema(
    path: Path, validators: dict[str, Any]
) -> None:
    document = json.loads(path.read_bytes())
    if path.stem in SCHEMA_GAPS:
        assert validators["usage_event"].is_valid(document)  # documented in $comment
    else:
        assert not validators["usage_event"].is_valid(document)


@pytest.mark.parametrize("stem", sorted(NOT_JSON))
def test_not_json_examples_are_not_json(stem: str) -> None:
    with pytest.raises((ValueError, RecursionError)):
        json.loads((INVALID / f"{stem}.json").read_bytes())


def test_every_invalid_example_has_a_reason_file() -> None:
    assert len(INVALID_EXAMPLES) >= 40
    for path in INVALID_EXAMPLES:
        assert path.with_suffix(".reason").is_file(), path.name
    assert {p.stem for p in INVALID.glob("*.reason")} == {p.stem for p in INVALID_EXAMPLES}
    stems = {p.stem for p in INVALID_EXAMPLES}
    assert stems >= NOT_JSON | SCHEMA_GAPS  # no stale names in the exception lists
    assert not NOT_JSON & SCHEMA_GAPS


# -- exported JSON Schema -------------------------------------------------------------------


def test_json_schema_files_are_up_to_date() -> None:
    assert export.stale() == [], "run: python -m schemas.export"
    assert export.main(["--check"]) == 0


def test_export_writes_and_check_detects_stale_files(tmp_path: Path) -> None:
    assert export.main(["--check", "--dir", str(tmp_path)]) == 1  # missing
    assert export.main(["--dir", str(tmp_path)]) == 0
    assert export.main(["--check", "--dir", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"usage_event.v1.json", "stats_record.v1.json", "alert.v1.json", "alert_rule.v1.json",
            "notification.v1.json", "notification_read.v1.json", "ws_client_frame.v1.json",
            "ws_server_frame.v1.json", "apikey_event.v1.json"} <= names
    (tmp_path / "alert.v1.json").write_text("{}")
    assert export.stale(tmp_path) == ["alert.v1.json"]
    assert export.main(["--check", "--dir", str(tmp_path)]) == 1
    (tmp_path / "old.v0.json").write_text("{}")
    assert export.write(tmp_path) == ["alert.v1.json", "old.v0.json"]
    assert export.stale(tmp_path) == []


def test_usage_event_schema_carries_the_decoder_only_rules() -> None:
    schema = json.loads(export.render()["usage_event.v1.json"])
    event = schema["$defs"]["UsageEvent"]
    ts = {branch["type"]: branch for branch in event["properties"]["ts"]["anyOf"]}
    assert ts["integer"]["minimum"] == MIN_TS_MS
    assert ts["integer"]["exclusiveMaximum"] == MAX_TS_MS
    assert "pattern" in ts["string"]
    assert event["properties"]["schema_version"]["enum"] == [1]
    assert str(MAX_EVENT_BYTES) in event["$comment"]


# -- every rule of DESIGN §1, with its exact reason ----------------------------------------

BASE: dict[str, Any] = {
    "event_id": "0b9f4a8e-3c1d-4f5e-9a7b-2c6d8e1f3a5b",
    "ts": 1_717_243_200_123,
    "user_id": "usr_1",
    "api_key_id": "key_1",
    "service": "openai",
    "status_code": 200,
    "latency_ms": 12.5,
}
REQUIRED = ("event_id", "ts", "user_id", "api_key_id", "service", "status_code", "latency_ms")
DROP = object()


def event(**changes: Any) -> bytes:
    doc = {k: v for k, v in {**BASE, **changes}.items() if v is not DROP}
    return json.dumps(doc, ensure_ascii=False).encode()


def with_raw(fragment: bytes) -> bytes:
    """BASE plus a raw JSON member (for tokens JSON encoders refuse to write)."""
    return event()[:-1] + b", " + fragment + b"}"


def reason_of(raw: bytes | bytearray | memoryview | str) -> str:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(raw)
    return caught.value.reason


REGEX_SERVICE = "service: expected `str` matching regex '^[a-z0-9][a-z0-9_.-]{0,63}$'"
TS_RANGE = f"ts: epoch milliseconds must be in [{MIN_TS_MS}, {MAX_TS_MS}), got "

REJECTED: list[tuple[str, bytes, str]] = [
    # not JSON
    ("not-json", b"hello", "event: not valid JSON (JSON is malformed: invalid character (byte 0))"),
    ("empty-body", b"", "event: not valid JSON (Input data was truncated)"),
    ("truncated", event()[:40], "event: not valid JSON (Input data was truncated)"),
    ("python-repr", b"{'event_id': 'x'}",
     "event: not valid JSON (JSON is malformed: object keys must be strings (byte 1))"),
    ("trailing", event() + b"x",  # msgspec's offset here is one past the character
     f"event: not valid JSON (JSON is malformed: trailing characters (byte {len(event()) + 1}))"),
    ("array", b"[" + event() + b"]", "event: expected `object`, got `array`"),
    ("string", b'"event"', "event: expected `object`, got `str`"),
    ("null", b"null", "event: expected `object`, got `null`"),
    # required fields
    *[(f"missing-{f}", event(**{f: DROP}), f"{f}: required field missing") for f in REQUIRED],
    *[(f"null-{f}", event(**{f: None}), f"{f}: expected `{t}`, got `null`")
      for f, t in (("event_id", "str"), ("user_id", "str"), ("api_key_id", "str"),
                   ("service", "str"), ("status_code", "int"), ("latency_ms", "float"))],
    # empty strings
    *[(f"empty-{f}", event(**{f: ""}), f"{f}: expected `str` of length >= 1")
      for f in ("event_id", "user_id", "api_key_id")],
    ("empty-service", event(service=""), REGEX_SERVICE),
    # wrong types
    ("event_id-int", event(event_id=7), "event_id: expected `str`, got `int`"),
    ("user_id-object", event(user_id={"id": 1}), "user_id: expected `str`, got `object`"),
    ("api_key_id-array", event(api_key_id=["k"]), "api_key_id: expected `str`, got `array`"),
    ("service-int", event(service=1), "service: expected `str`, got `int`"),
    ("status-string", event(status_code="200"), "status_code: expected `int`, got `str`"),
    ("status-float", event(status_code=200.0), "status_code: expected `int`, got `float`"),
    ("status-bool", event(status_code=True), "status_code: expected `int`, got `bool`"),
    ("latency-string", event(latency_ms="12ms"), "latency_ms: expected `float`, got `str`"),
    ("latency-bool", event(latency_ms=False), "latency_ms: expected `float`, got `bool`"),
    ("endpoint-int", event(endpoint=1), "endpoint: expected `str | null`, got `int`"),
    ("tokens-float", event(tokens_in=1.5), "tokens_in: expected `int | null`, got `float`"),
    ("tokens-string", event(tokens_out="3"), "tokens_out: expected `int | null`, got `str`"),
    ("cost-string", event(cost_usd="0.1"), "cost_usd: expected `float | null`, got `str`"),
    ("bytes-float", event(request_bytes=1.5), "request_bytes: expected `int | null`, got `float`"),
    ("region-bool", event(region=True), "region: expected `str | null`, got `bool`"),
    ("schema_version-string", event(schema_version="1"),
     "schema_version: expected `int`, got `str`"),
    # numbers out of range
    ("status-99", event(status_code=99), "status_code: expected `int` >= 100"),
    ("status-600", event(status_code=600), "status_code: expected `int` <= 599"),
    ("status-negative", event(status_code=-200), "status_code: expected `int` >= 100"),
    ("latency-negative", event(latency_ms=-0.001), "latency_ms: expected `float` >= 0.0"),
    ("latency-over-1h", event(latency_ms=3_600_000.001),
     "latency_ms: expected `float` <= 3600000.0"),
    *[(f"{f}-negative", event(**{f: -1}), f"{f}: expected `int` >= 0")
      for f in ("tokens_in", "tokens_out", "request_bytes", "response_bytes")],
    ("tokens-over-2^53", event(tokens_in=2**53 + 1),
     "tokens_in: expected `int` <= 9007199254740992"),
    ("cost-negative", event(cost_usd=-0.01), "cost_usd: expected `float` >= 0.0"),
    ("number-overflow", with_raw(b'"latency_ms": 1e400'), "latency_ms: number out of range"),
    # NaN / Infinity are not JSON
    *[(name, with_raw(fragment), f"{field}: {token} is not valid JSON (numbers must be finite; "
                                 f"byte {with_raw(fragment).index(token.encode())})")
      for name, fragment, field, token in (
          ("nan-tokens", b'"tokens_in": NaN', "tokens_in", "NaN"),
          ("infinity-latency", b'"latency_ms":Infinity', "latency_ms", "Infinity"),
          ("minus-infinity-cost", b'"cost_usd": -Infinity', "cost_usd", "-Infinity"),
          ("nan-in-array", b'"junk": [1, NaN]', "event", "NaN"),
      )],
    # oversized strings
    ("event_id-65", event(event_id="e" * 65), "event_id: expected `str` of length <= 64"),
    ("user_id-129", event(user_id="u" * 129), "user_id: expected `str` of length <= 128"),
    ("api_key_id-129", event(api_key_id="k" * 129), "api_key_id: expected `str` of length <= 128"),
    ("endpoint-257", event(endpoint="/" * 257), "endpoint: expected `str` of length <= 256"),
    ("error_type-129", event(error_type="x" * 129), "error_type: expected `str` of length <= 128"),
    ("region-65", event(region="r" * 65), "region: expected `str` of length <= 64"),
    ("sdk-65", event(sdk="s" * 65), "sdk: expected `str` of length <= 64"),
    # service pattern; method
    ("service-uppercase", event(service="OpenAI"), REGEX_SERVICE),
    ("service-leading-dash", event(service="-openai"), REGEX_SERVICE),
    ("service-leading-dot", event(service=".openai"), REGEX_SERVICE),
    ("service-space", event(service="open ai"), REGEX_SERVICE),
    ("service-slash", event(service="aws/s3"), REGEX_SERVICE),
    ("service-65", event(service="s" * 65), REGEX_SERVICE),
    ("method-path", event(method="GET /x"),
     "method: expected `str` matching regex '^[A-Za-z]{1,16}$'"),
    # ts
    ("ts-no-offset", event(ts="2024-06-01T12:00:00"),
     "ts: RFC 3339 time needs an offset (Z or ±hh:mm)"),
    ("ts-date-only", event(ts="2024-06-01"),
     "ts: not an RFC 3339 date-time (e.g. 2024-05-01T12:00:00Z)"),
    ("ts-words", event(ts="yesterday"),
     "ts: not an RFC 3339 date-time (e.g. 2024-05-01T12:00:00Z)"),
    ("ts-numeric-string", event(ts="1717243200123"),
     "ts: not an RFC 3339 date-time (e.g. 2024-05-01T12:00:00Z)"),
    ("ts-bool", event(ts=True),
     "ts: expected an RFC 3339 string or epoch milliseconds, got `bool`"),
    ("ts-null", event(ts=None),
     "ts: expected an RFC 3339 string or epoch milliseconds, got `null`"),
    ("ts-object", event(ts={"ms": 1}),
     "ts: expected an RFC 3339 string or epoch milliseconds, got `object`"),
    ("ts-seconds", event(ts=1_717_243_200), f"{TS_RANGE}1717243200"),
    ("ts-microseconds", event(ts=1_717_243_200_123_000), f"{TS_RANGE}1717243200123000"),
    ("ts-zero", event(ts=0), f"{TS_RANGE}0"),
    ("ts-negative", event(ts=-1), f"{TS_RANGE}-1"),
    ("ts-just-below", event(ts=MIN_TS_MS - 1), f"{TS_RANGE}{MIN_TS_MS - 1}"),
    ("ts-upper-bound", event(ts=MAX_TS_MS), f"{TS_RANGE}{MAX_TS_MS}"),
    ("ts-float-below", event(ts=999.5), f"{TS_RANGE}999.5"),
    ("ts-overflow", with_raw(b'"ts": 1e400'), "ts: number out of range"),
    ("ts-1999", event(ts="1999-12-31T23:59:59.999Z"),
     "ts: must be between 2000-01-01 and 2100-01-01, got 1999-12-31T23:59:59.999000+00:00"),
    ("ts-2100", event(ts="2100-01-01T00:00:00Z"),
     "ts: must be between 2000-01-01 and 2100-01-01, got 2100-01-01T00:00:00+00:00"),
    ("ts-offset-pushes-below", event(ts="2000-01-01T00:30:00+01:00"),
     "ts: must be between 2000-01-01 and 2100-01-01, got 2000-01-01T00:30:00+01:00"),
    # schema version
    ("schema_version-2", event(schema_version=2),
     "schema_version: unsupported version 2 (supported: 1)"),
    ("schema_version-0", event(schema_version=0),
     "schema_version: unsupported version 0 (supported: 1)"),
    # deeply nested junk in an unknown field
    ("nested-arrays", with_raw(b'"junk": ' + b"[" * 5000 + b"]" * 5000),
     "event: nested too deeply"),
    ("nested-objects", with_raw(b'"junk": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000),
     "event: nested too deeply"),
    # too large
    ("over-64KiB", event(padding="x" * MAX_EVENT_BYTES),
     f"event: {len(event(padding='x' * MAX_EVENT_BYTES))} bytes exceeds the 65536 byte limit"),
]


@pytest.mark.parametrize(("raw", "expected"), [(r, e) for _, r, e in REJECTED],
                         ids=[name for name, _, _ in REJECTED])
def test_rejected_with_exact_reason(raw: bytes, expected: str) -> None:
    assert reason_of(raw) == expected


def _utf8_case(raw: bytes, needle: bytes) -> tuple[bytes, int]:
    return raw, raw.index(needle)


def test_invalid_utf8_is_rejected_wherever_it_is() -> None:
    raw, at = _utf8_case(event(user_id="usr_\u00ff").replace("\u00ff".encode(), b"\xff"), b"\xff")
    assert reason_of(raw) == f"user_id: invalid UTF-8 at byte {at}"
    raw, at = _utf8_case(with_raw(b'"note": "caf\xe9"'), b"\xe9")
    assert reason_of(raw) == f"note: invalid UTF-8 at byte {at}"  # an unknown field too
    raw, at = _utf8_case(with_raw(b'"\xfe": 1'), b"\xfe")
    assert reason_of(raw) == f"event: invalid UTF-8 at byte {at}"  # in a key
    raw, at = _utf8_case(event(endpoint="/XX").replace(b"/XX", b"/\xc0\xaf"), b"\xc0")
    assert reason_of(raw) == f"endpoint: invalid UTF-8 at byte {at}"  # overlong encoding
    raw, at = _utf8_case(event(region="XX").replace(b'"XX"', b'"\xed\xa0\x80"'), b"\xed")
    assert reason_of(raw) == f"region: invalid UTF-8 at byte {at}"  # encoded surrogate
    raw, at = _utf8_case(event(sdk="XX").replace(b'"XX"', b'"\xe2\x82"'), b"\xe2")
    assert reason_of(raw) == f"sdk: invalid UTF-8 at byte {at}"  # cut multi-byte sequence


def test_lone_surrogate_escapes_are_rejected() -> None:
    raw = with_raw(b'"region": "\\ud800x"')
    at = raw.index(b"\\ud800")
    assert reason_of(raw) == f"region: \\ud800 is a lone UTF-16 surrogate, not text (byte {at})"
    raw = with_raw(b'"note": "\\udc00"')
    at = raw.index(b"\\udc00")
    assert reason_of(raw) == f"note: \\udc00 is a lone UTF-16 surrogate, not text (byte {at})"
    text = event()[:-1].decode() + ', "note": "\ud800"}'
    at = len(text) - 3
    assert reason_of(text) == f"event: invalid Unicode (lone surrogate at character {at})"
    # a proper pair is fine
    assert decode_event(with_raw(b'"region": "\\ud83d\\ude00"')).region == "\U0001f600"


def _padded(raw: bytes, size: int) -> bytes:
    """`raw` (ending in `"padding": ""}`) with the padding grown to make it `size` bytes."""
    return raw[:-2] + b"x" * (size - len(raw)) + raw[-2:]


ACCEPTED: list[tuple[str, bytes]] = [
    ("minimal", event()),
    ("all-fields", event(endpoint="/v1/chat/completions", method="POST", tokens_in=10,
                         tokens_out=0, cost_usd=0, request_bytes=0, response_bytes=2**53,
                         error_type="", region="", sdk="", schema_version=1)),
    ("optional-nulls", event(endpoint=None, method=None, tokens_in=None, cost_usd=None,
                             error_type=None, region=None, sdk=None)),
    ("limits-event_id-64", event(event_id="e" * 64)),
    ("limits-ids-128", event(user_id="u" * 128, api_key_id="k" * 128)),
    ("limits-unicode-counts-characters", event(user_id="\u00e9" * 128)),
    ("limits-endpoint-256", event(endpoint="/" * 256)),
    ("limits-error_type-128", event(error_type="x" * 128, region="r" * 64, sdk="s" * 64)),
    ("limits-service-64", event(service="s" * 64)),
    ("service-punctuation", event(service="google-maps.v2_beta")),
    ("service-one-char", event(service="x")),
    ("status-100", event(status_code=100)),
    ("status-599", event(status_code=599)),
    ("latency-0", event(latency_ms=0)),
    ("latency-1h", event(latency_ms=3_600_000)),
    ("latency-int", event(latency_ms=5)),
    ("ts-min", event(ts=MIN_TS_MS)),
    ("ts-max-1", event(ts=MAX_TS_MS - 1)),
    ("ts-float-ms", event(ts=1_717_243_200_123.5)),
    ("ts-rfc3339-z", event(ts="2024-06-01T12:00:00Z")),
    ("ts-rfc3339-offset", event(ts="2024-06-01T14:00:00.5+02:00")),
    ("ts-rfc3339-lowercase", event(ts="2024-06-01t12:00:00z")),
    ("unknown-fields", event(trace_id="abc", http={"retries": [1, 2, {"x": None}]}, n=1e300)),
    ("unknown-nested-50", with_raw(b'"junk": ' + b"[" * 50 + b"]" * 50)),
    ("unknown-non-ascii", event(note="caf\u00e9 \u65e5\u672c")),
    ("exactly-64KiB", _padded(event(padding=""), MAX_EVENT_BYTES)),
]


@pytest.mark.parametrize("raw", [r for _, r in ACCEPTED], ids=[n for n, _ in ACCEPTED])
def test_accepted(raw: bytes) -> None:
    assert isinstance(decode_event(raw), UsageEvent)


def test_exactly_64_kib_is_the_limit() -> None:
    raw = dict(ACCEPTED)["exactly-64KiB"]
    assert len(raw) == MAX_EVENT_BYTES
    decode_event(raw)
    bigger = raw[:-2] + b"x" + raw[-2:]
    assert reason_of(bigger) == "event: 65537 bytes exceeds the 65536 byte limit"


def test_unknown_fields_are_ignored_not_kept() -> None:
    decoded = decode_event(event(secret="sk-live-123", nested={"a": [1]}))
    assert decoded == decode_event(event())
    assert "sk-live-123" not in msgspec.json.encode(decoded).decode()


def test_defaults_and_derived_values() -> None:
    decoded = decode_event(event())
    assert decoded.schema_version == 1
    assert decoded.endpoint is None and decoded.tokens_in is None
    assert decoded.ts_ms == 1_717_243_200_123
    assert decode_event(event(ts="2024-06-01T14:00:00.123+02:00")).ts_ms == 1_717_243_200_123
    assert decode_event(event(ts=1_717_243_200_123.9)).ts_ms == 1_717_243_200_123
    assert decode_event(event(status_code=399)).is_success
    assert not decode_event(event(status_code=400)).is_success


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: b.decode()],
                         ids=["bytes", "bytearray", "memoryview", "str"])
def test_input_types(wrap: Callable[[bytes], Any]) -> None:
    assert decode_event(wrap(event())).user_id == "usr_1"
    with pytest.raises(InvalidEvent, match="status_code: expected `int` <= 599"):
        decode_event(wrap(event(status_code=600)))
