"""JSON Schema (draft 2020-12) for every keypulse message, for SDK authors in other languages.

    python -m schemas.export            # (re)write schemas/jsonschema/<name>.v1.json
    python -m schemas.export --check    # exit 1 if a file is missing or stale

The schemas are generated from the msgspec models with `msgspec.json.schema`, so they
cannot drift from the code; a unit test runs `--check`. A few rules of the usage event
are enforced in `decode_event` rather than by the model (the `ts` range, the schema
version, the 64 KiB limit); `_refine_usage_event` writes the expressible ones into the
schema and lists the rest under `$comment`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from schemas.alerts import Alert, AlertRule
from schemas.api_keys import ApiKeyEvent
from schemas.audit import AuditRecord
from schemas.events import MAX_EVENT_BYTES, MAX_TS_MS, MIN_TS_MS, SCHEMA_VERSION, UsageEvent
from schemas.notifications import Notification, NotificationDelete, NotificationRead
from schemas.stats import StatsRecord

logger = logging.getLogger(__name__)

JSONSCHEMA_DIR = Path(__file__).resolve().parent / "jsonschema"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
VERSION = 1

Schema = dict[str, Any]


@dataclass(frozen=True)
class Message:
    """One exported message: its file stem, model and where it travels."""

    name: str
    model: Any
    where: str

    @property
    def filename(self) -> str:
        return f"{self.name}.v{VERSION}.json"


MESSAGES: tuple[Message, ...] = (
    Message("usage_event", UsageEvent, "Kafka usage.events (key user_id); WebSocket track_usage"),
    Message("stats_record", StatsRecord, "Kafka usage.stats; ClickHouse usage_stats"),
    Message("alert", Alert, "Kafka usage.alerts; ClickHouse alerts"),
    Message("alert_rule", AlertRule, "Kafka alert.rules (compacted, key rule_id)"),
    Message("notification", Notification, "Kafka notifications (kind = notification)"),
    Message("notification_read", NotificationRead, "Kafka notifications (kind = read)"),
    Message("notification_delete", NotificationDelete, "Kafka notifications (kind = delete)"),
    Message("apikey_event", ApiKeyEvent, "Kafka apikey.events (key user_id)"),
    Message("audit_record", AuditRecord, "ClickHouse audit_log"),
)

# RFC 3339 date-time with a mandatory offset, as decode_event accepts it.
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)

USAGE_EVENT_FIELDS: dict[str, str] = {
    "event_id": "Idempotency key (a UUID is recommended); repeats within 1 h count once.",
    "ts": "Event time: RFC 3339 with an offset, or epoch milliseconds; 2000-01-01 <= ts "
          "< 2100-01-01.",
    "user_id": "Owner of the API key; also the Kafka message key.",
    "api_key_id": "Id of the API key; never the secret.",
    "service": "Provider called with the key, e.g. openai, anthropic, stripe.",
    "status_code": "HTTP status of the call; < 400 is a success, 4xx a client error, "
                   "5xx a server error.",
    "latency_ms": "Call duration in milliseconds.",
    "endpoint": "Path called, e.g. /v1/chat/completions.",
    "method": "HTTP method.",
    "tokens_in": "Input tokens (LLM providers).",
    "tokens_out": "Output tokens (LLM providers).",
    "cost_usd": "Cost of the call in US dollars.",
    "request_bytes": "Request body size.",
    "response_bytes": "Response body size.",
    "error_type": "Provider error code or class, for failed calls.",
    "region": "Region the call was made from.",
    "sdk": "Reporting SDK and version.",
    "schema_version": "Version of this schema; only 1 is supported.",
}


def _document(message: Message) -> Schema:
    generated = msgspec.json.schema(message.model)
    doc: Schema = {
        "$schema": DIALECT,
        "title": f"{message.model.__name__} v{VERSION}",
        "description": f"{(message.model.__doc__ or message.name).strip().splitlines()[0]} "
                       f"Travels on: {message.where}.",
    }
    doc.update(generated)
    _refine(doc["$defs"])
    return doc


def _refine(defs: dict[str, Schema]) -> None:
    if "UsageEvent" in defs:
        _refine_usage_event(defs["UsageEvent"])


def _refine_usage_event(event: Schema) -> None:
    """Rules decode_event enforces beyond the model, where JSON Schema can say them."""
    props = event["properties"]
    for name, text in USAGE_EVENT_FIELDS.items():
        props[name]["description"] = text
    for branch in props["ts"]["anyOf"]:
        if branch.get("type") in ("integer", "number"):
            branch["minimum"] = MIN_TS_MS
            branch["exclusiveMaximum"] = MAX_TS_MS
        elif branch.get("type") == "string":
            branch["pattern"] = RFC3339_PATTERN
    props["schema_version"]["enum"] = [SCHEMA_VERSION]
    event["$comment"] = (
        f"Also enforced by keypulse: the whole message is UTF-8 JSON of at most "
        f"{MAX_EVENT_BYTES} bytes; an RFC 3339 ts must fall in [2000-01-01, 2100-01-01); "
        "unknown fields are ignored."
    )


def _ws_documents() -> dict[str, Schema]:
    """The WebSocket client and server frames, one `oneOf` per direction."""
    try:
        from schemas import ws
    except ImportError:  # pragma: no cover - schemas/ws.py exists in this tree
        return {}
    client = {name: (kind or UsageEvent) for name, kind in ws.CLIENT_EVENTS.items()}
    server = dict(ws.SERVER_EVENTS)
    models = sorted({*client.values(), *server.values()},
                    key=lambda t: t.__name__)
    (_, defs) = msgspec.json.schema_components(models, ref_template="#/$defs/{name}")
    _refine(defs)

    def ref(kind: Any) -> Schema:
        return {"$ref": f"#/$defs/{kind.__name__}"}

    def used(frames: list[Schema]) -> Schema:
        """Only the $defs reachable from the frames, so each file stands alone."""
        needed: set[str] = set()
        todo = [json.dumps(frames)]
        while todo:
            text = todo.pop()
            for name in defs:
                if f'"#/$defs/{name}"' in text and name not in needed:
                    needed.add(name)
                    todo.append(json.dumps(defs[name]))
        return {name: defs[name] for name in sorted(needed)}

    client_frames: list[Schema] = [
        {
            "title": name,
            "type": "object",
            "properties": {"event": {"const": name}, "data": ref(kind)},
            # `data` defaults to {}: required only when the event has required fields.
            "required": ["event", "data"] if _has_required(kind) else ["event"],
        }
        for name, kind in client.items()
    ]
    server_frames: list[Schema] = []
    for name, kind in server.items():
        properties: Schema = {
            "event": {"const": name},
            "data": ref(kind),
            "ts": {"type": "integer", "description": "epoch milliseconds"},
            "seq": {"type": "integer", "minimum": 1, "description": "per connection"},
        }
        required = ["event", "data", "ts", "seq"]
        if name in ws.CURSOR_EVENTS:
            properties["cursor"] = {"type": "string", "description": "opaque resume token"}
            required.append("cursor")
        server_frames.append({"title": name, "type": "object", "properties": properties,
                              "required": required})
    return {
        "ws_client_frame": {
            "$schema": DIALECT,
            "title": f"WebSocket client frame v{VERSION}",
            "description": 'A frame a client sends on /ws: {"event": NAME, "data": {...}}.',
            "oneOf": client_frames,
            "$defs": used(client_frames),
        },
        "ws_server_frame": {
            "$schema": DIALECT,
            "title": f"WebSocket server frame v{VERSION}",
            "description": 'A frame the server sends on /ws: {"event": NAME, "data": {...}, '
                           '"ts": ms, "seq": n}.',
            "oneOf": server_frames,
            "$defs": used(server_frames),
        },
    }


def _has_required(model: Any) -> bool:
    return any(f.required for f in msgspec.structs.fields(model))


def documents() -> dict[str, Schema]:
    """Every exported schema by name (file stem without the version)."""
    docs = {m.name: _document(m) for m in MESSAGES}
    docs.update(_ws_documents())
    return docs


def render() -> dict[str, bytes]:
    """File name → exact file contents."""
    return {
        f"{name}.v{VERSION}.json": (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
        for name, doc in sorted(documents().items())
    }


def stale(directory: Path = JSONSCHEMA_DIR) -> list[str]:
    """Files that are missing, differ from `render()`, or are no longer generated."""
    wanted = render()
    out = [name for name, data in wanted.items()
           if not (directory / name).is_file() or (directory / name).read_bytes() != data]
    if directory.is_dir():
        out += sorted(p.name for p in directory.glob("*.json") if p.name not in wanted)
    return out


def write(directory: Path = JSONSCHEMA_DIR) -> list[str]:
    """Bring `directory` up to date; the names of the files written or removed."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = render()
    changed = stale(directory)
    for name in changed:
        path = directory / name
        if name in wanted:
            path.write_bytes(wanted[name])
        else:
            path.unlink()
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the files are missing or stale; write nothing")
    parser.add_argument("--dir", type=Path, default=JSONSCHEMA_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        outdated = stale(args.dir)
        if outdated:
            logger.error("stale JSON Schema files in %s: %s (run: python -m schemas.export)",
                         args.dir, ", ".join(outdated))
            return 1
        logger.info("%d JSON Schema files in %s are up to date", len(render()), args.dir)
        return 0
    changed = write(args.dir)
    logger.info("wrote %d of %d JSON Schema files to %s%s", len(changed), len(render()),
                args.dir, f": {', '.join(changed)}" if changed else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
