"""`keypulse dlq inspect|replay`: look at `usage.events.dlq`, and move dead letters back to
`usage.events`, each source record once (keypulse/dlq.py, docs/dead-letters.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from core import topics
from core.errors import ConfigError
from core.settings import Settings

if TYPE_CHECKING:
    from keypulse.dlq import DeadLetterRecord

VALUE_CHARS = 200  # of a value in inspect's text output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = sub.add_parser(
        "inspect",
        help="counts by reason and partition, then records (commits nothing)",
        description="Reads the DLQ from the beginning without committing anything: counts by "
        "reason and by partition, then up to --limit records with their headers, key and "
        "value. Progress goes to stderr.",
    )
    inspect.add_argument(
        "--reason",
        default=None,
        help="only records whose reason is R (its name, e.g. ts_in_future, "
        "or the start of its text)",
    )
    inspect.add_argument(
        "--limit", type=int, default=20, help="records to print after the counts (default 20)"
    )
    inspect.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per record (value as text if UTF-8, else "
        "base64), the input of `replay --from-file`",
    )
    replay = sub.add_parser(
        "replay",
        help="move dead letters back to usage.events, each source record once",
        description="Moves dead letters back to usage.events, one record per source record "
        "(identity: keypulse.source.topic/partition/offset), carrying it in "
        "keypulse.replay.origin. Replayed identities are remembered in the compacted topic "
        "usage.events.dlq.replayed and never replayed again. Without --from-file only reasons "
        "that can go back as they are: ts_in_future, storage_error (usage_events rows), and "
        "when named with --reason, ts_beyond_retention and too_many_services.",
    )
    replay.add_argument("--reason", default=None, help="only records whose reason is R")
    replay.add_argument(
        "--from-file",
        type=Path,
        default=None,
        metavar="F",
        help="replay the JSON lines of `inspect --json` (values fixed by hand) "
        "instead of reading the DLQ",
    )
    replay.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be replayed; produce and commit nothing",
    )
    replay.add_argument(
        "--group",
        default=None,
        help="the consumer group whose DLQ offsets record how far replay has "
        "looked (default keypulse-dlq-replay)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "inspect":
        return inspect(settings, reason=args.reason, limit=args.limit, as_json=args.json)
    return replay(
        settings,
        reason=args.reason,
        from_file=args.from_file,
        dry_run=args.dry_run,
        group=args.group,
    )


def inspect(
    settings: Settings, *, reason: str | None, limit: int, as_json: bool, out: IO[str] | None = None
) -> int:
    from keypulse.dlq import Progress, read_topic, reason_matches, reason_name

    out = out or sys.stdout
    topic = settings.topic(topics.USAGE_EVENTS_DLQ)
    by_reason: Counter[str] = Counter()
    by_partition: Counter[int] = Counter()
    shown: list[DeadLetterRecord] = []
    for record in read_topic(settings, topic, progress=Progress(f"reading {topic}", 0)):
        if not reason_matches(record.reason, reason):
            continue
        by_reason[reason_name(record.reason) or "(no reason)"] += 1
        by_partition[record.partition] += 1
        if len(shown) < limit:
            shown.append(record)
    if as_json:
        for record in shown:
            print(json.dumps(record.to_json(), ensure_ascii=False), file=out)
        print(f"{topic}: {sum(by_reason.values())} records, {len(shown)} printed", file=sys.stderr)
        return 0
    total = sum(by_reason.values())
    print(f"{topic}: {total} records" + (f" with reason {reason}" if reason else ""), file=out)
    for name, count in by_reason.most_common():
        print(f"  {count:>8}  {name}", file=out)
    print("by partition:", file=out)
    for partition, count in sorted(by_partition.items()):
        print(f"  {count:>8}  partition {partition}", file=out)
    for record in shown:
        print(f"\n{record.topic}[{record.partition}]@{record.offset} {record.identity}", file=out)
        for name, value in record.headers:
            print(f"  {name}: {_short(value, VALUE_CHARS)}", file=out)
        print(f"  key: {_short(record.key, VALUE_CHARS)}", file=out)
        print(f"  value: {_short(record.value, VALUE_CHARS)}", file=out)
    if total > len(shown):
        print(f"\n{len(shown)} of {total} records printed (--limit)", file=out)
    return 0


def replay(
    settings: Settings,
    *,
    reason: str | None,
    from_file: Path | None,
    dry_run: bool,
    group: str | None,
    out: IO[str] | None = None,
) -> int:
    from confluent_kafka import Consumer

    from core.kafka import consumer_config
    from keypulse.dlq import (
        DEFAULT_GROUP,
        Progress,
        Replayer,
        ReplayPolicy,
        Summary,
        check_replayable,
        ensure_ledger,
        read_ledger,
        read_topic,
    )

    out = out or sys.stdout
    source: Iterable[DeadLetterRecord] | None = None
    if from_file is None:
        check_replayable(reason)
    else:
        source = _from_file(from_file)  # a bad line stops the replay before anything is sent
    events_topic = settings.topic(topics.USAGE_EVENTS)
    dlq_topic = settings.topic(topics.USAGE_EVENTS_DLQ)
    policy = ReplayPolicy(
        events_topic,
        int(time.time() * 1000),
        settings.max_clock_skew_seconds,
        settings.events_ttl_days,
        settings.dedup_horizon_seconds,
        reason=reason,
        from_file=from_file is not None,
        done=read_ledger(settings),
    )
    consumer = None
    if from_file is None:
        consumer = Consumer(
            consumer_config(
                settings, group_id=group or DEFAULT_GROUP, **{"enable.partition.eof": True}
            )
        )
    replayer = (
        None
        if dry_run
        else Replayer(settings, events_topic, ensure_ledger(settings), consumer, dlq_topic)
    )
    summary = Summary()
    batch: list[DeadLetterRecord] = []
    positions: dict[int, int] = {}
    try:
        if source is None:
            source = read_topic(
                settings, dlq_topic, consumer=consumer, progress=Progress(f"reading {dlq_topic}", 0)
            )
        for record in source:
            summary.read += 1
            positions[record.partition] = record.offset + 1
            why = policy.decide(record)
            if why is not None:
                summary.skipped[why] += 1
                continue
            summary.replayed += 1
            if dry_run:
                print(
                    f"would replay {record.identity} ({record.reason}) "
                    f"key={_short(record.key, 64)}",
                    file=out,
                )
                continue
            batch.append(record)
            if len(batch) >= 500 and replayer is not None:
                replayer.send(batch, positions if consumer is not None else {})
                batch, positions = [], {}
        if replayer is not None:
            replayer.send(batch, positions if consumer is not None else {})
    finally:
        if consumer is not None:
            consumer.close()
    needs_fix = {why for why in summary.skipped if why.startswith(("needs a fix", "invalid"))}
    if needs_fix and from_file is None:
        print(
            "dead letters that need a fix go back with `keypulse dlq inspect --reason R "
            "--json > fixed.jsonl`, an edit, then `keypulse dlq replay --from-file "
            "fixed.jsonl`",
            file=sys.stderr,
        )
    print(summary.line(dry_run), file=out)
    return 0


def _from_file(path: Path) -> list[DeadLetterRecord]:
    from keypulse.dlq import DeadLetterRecord

    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        msg = f"--from-file {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(DeadLetterRecord.from_json(json.loads(line)))
        except ValueError as exc:
            msg = f"--from-file {path}, line {number}: {exc}"
            raise ConfigError(msg) from None
    return records


def _short(data: bytes | None, chars: int) -> str:
    if data is None:
        return "(null)"
    text = data.decode(errors="replace")
    if len(text) > chars:
        return f"{text[:chars]}… ({len(data)} bytes)"
    return text
