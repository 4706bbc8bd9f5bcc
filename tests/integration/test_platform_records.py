"""Platform records produced on Kafka (as the bridge and the API do) reach ClickHouse once.

`keypulse run` reads `notifications` and `apikey.events` (pipeline/records.py) and stores
each notification, read-state change, deletion and API-key event in its table, exactly once;
junk and records whose `user_id` is not their key are refused and stored nowhere. While the
process runs the test reads the tables through `/clickhouse/` (the process owns the embedded
engine); once it has stopped, directly.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Producer, TopicPartition

from core import topics
from core.auth import ANALYST_ROLE, mint_token
from core.kafka import consumer_config, produce, producer_config
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from pipeline.items import PartitionOutput
from pipeline.metrics import PipelineMetrics
from pipeline.sinks import STORED_HEADER, OutputSink
from schemas.api_keys import ApiKeyAction, ApiKeyEvent, DeclaredBy
from schemas.notifications import (
    Notification,
    NotificationDelete,
    NotificationRead,
    NotificationType,
)
from tests.integration.harness import RunProcess, embedded

pytestmark = pytest.mark.integration

Message = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]
"""(unprefixed topic, key, value, headers)"""


@dataclass
class Platform:
    """Records as the bridge and the API produce them, and what the tables must then hold."""

    base_ms: int = field(default_factory=lambda: int(time.time() * 1000) - 120_000)
    ticks: int = 0
    notes: dict[tuple[str, str], Notification] = field(default_factory=dict)
    reads: dict[tuple[str, str], NotificationRead] = field(default_factory=dict)
    read_messages: int = 0
    deletes: dict[tuple[str, str], NotificationDelete] = field(default_factory=dict)
    key_events: dict[tuple[str, str], ApiKeyEvent] = field(default_factory=dict)
    pending: list[Message] = field(default_factory=list)

    def at(self) -> datetime:
        """A later time at each call: the last change of a read state is the latest."""
        self.ticks += 1
        return datetime.fromtimestamp((self.base_ms + self.ticks) / 1000, UTC)

    def note(self, user: str, nid: str) -> None:
        note = Notification(notification_id=nid, user_id=user, type=NotificationType.INFO,
                            template="announcement", title=f"title {nid}",
                            message=f"body {nid}", created_at=self.at(),
                            data={"title": f"title {nid}"})
        self.notes[user, nid] = note
        self.pending.append((topics.NOTIFICATIONS, user.encode(), msgspec.json.encode(note),
                             None))

    def read(self, user: str, nid: str, flag: bool = True) -> None:
        change = NotificationRead(notification_id=nid, user_id=user, read=flag, at=self.at())
        self.reads[user, nid] = change
        self.read_messages += 1
        self.pending.append((topics.NOTIFICATIONS, user.encode(), msgspec.json.encode(change),
                             None))

    def delete(self, user: str, nid: str) -> None:
        gone = NotificationDelete(notification_id=nid, user_id=user, at=self.at())
        self.deletes[user, nid] = gone
        self.pending.append((topics.NOTIFICATIONS, user.encode(), msgspec.json.encode(gone),
                             None))

    def key_event(self, user: str, event_id: str, action: ApiKeyAction) -> None:
        event = ApiKeyEvent(action=action, user_id=user, api_key_id=f"key-{event_id}",
                            service="openai", name="prod", at=self.at(), event_id=event_id,
                            declared_by=DeclaredBy.SERVICE)
        self.key_events[user, event_id] = event
        self.pending.append((topics.APIKEY_EVENTS, user.encode(), msgspec.json.encode(event),
                             None))

    def raw(self, topic: str, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes]] | None = None) -> None:
        """A record that must not be stored."""
        self.pending.append((topic, key, value, headers))

    def send(self, settings: Settings) -> None:
        producer = Producer(producer_config(settings))
        for topic, key, value, headers in self.pending:
            produce(producer, settings.topic(topic), value, key,  # type: ignore[arg-type]
                    headers=headers)  # type: ignore[arg-type]
        assert producer.flush(30) == 0
        self.pending = []

    def users(self) -> set[str]:
        return {user for user, _ in [*self.notes, *self.reads, *self.deletes, *self.key_events]
                if user != "*"}

    def unread(self, user: str) -> int:
        """What `GET /v1/notifications/unread-count` answers for `user`."""
        return sum(
            1 for (owner, nid) in self.notes
            if owner in (user, "*") and (user, nid) not in self.deletes
            and not (self.reads.get((user, nid)) and self.reads[user, nid].read))

    def counts(self) -> dict[str, int]:
        return {"notifications": len(self.notes), "notification_reads": len(self.reads),
                "notification_deletes": len(self.deletes), "api_key_events": len(self.key_events)}


# -- reading the tables ----------------------------------------------------------------------

COUNTS = ("SELECT (SELECT count() FROM notifications FINAL) AS notifications, "
          "(SELECT count() FROM notification_reads FINAL) AS notification_reads, "
          "(SELECT count() FROM notification_deletes FINAL) AS notification_deletes, "
          "(SELECT count() FROM api_key_events FINAL) AS api_key_events")


def unread_sql(user: str, db: str = "") -> str:
    """The unread count as the API reads it: every table FINAL (`db`: "keypulse." or none)."""
    return (f"SELECT count() AS unread FROM {db}notifications FINAL "
            f"WHERE user_id IN ('{user}', '*') AND notification_id NOT IN "
            f"(SELECT notification_id FROM {db}notification_deletes FINAL WHERE user_id = '{user}')"
            f" AND notification_id NOT IN (SELECT notification_id FROM {db}notification_reads "
            f"FINAL WHERE user_id = '{user}' AND read)")


def live_unread(run: RunProcess, users: set[str]) -> dict[str, int]:
    return {user: int(sql(run, unread_sql(user))[0]["unread"]) for user in users}


def sql(run: RunProcess, query: str) -> list[dict[str, Any]]:
    """Rows of `query` through the live process's `/clickhouse/` (analyst token)."""
    token = mint_token(load(dev=True), "records-analyst", roles=(ANALYST_ROLE,))
    request = urllib.request.Request(
        f"http://127.0.0.1:{run.port}/clickhouse/?default_format=JSONEachRow",
        data=query.encode(), method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return [json.loads(line) for line in response.read().splitlines() if line]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{exc.code}: {exc.read()[:500]!r}") from None


def wait_for_counts(run: RunProcess, want: dict[str, int], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        run.assert_alive()
        [got] = sql(run, COUNTS)
        got = {name: int(value) for name, value in got.items()}
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"tables hold {got}, expected {want}")
        time.sleep(0.3)


def assert_tables(client: Client, platform: Platform) -> None:
    """Every record exactly as sent, once (FINAL), and the counts the API would read."""
    notes = client.query("SELECT user_id, notification_id, title, message, created_at "
                         "FROM keypulse.notifications FINAL").result_rows
    assert sorted((u, n, t, m, c.replace(tzinfo=UTC)) for u, n, t, m, c in notes) == sorted(
        (u, n, x.title, x.message, x.created_at) for (u, n), x in platform.notes.items())
    reads = client.query("SELECT user_id, notification_id, read, at "
                         "FROM keypulse.notification_reads FINAL").result_rows
    assert sorted((u, n, bool(r), a.replace(tzinfo=UTC)) for u, n, r, a in reads) == sorted(
        (u, n, x.read, x.at) for (u, n), x in platform.reads.items())
    deletes = client.query("SELECT user_id, notification_id, at "
                           "FROM keypulse.notification_deletes FINAL").result_rows
    assert sorted((u, n, a.replace(tzinfo=UTC)) for u, n, a in deletes) == sorted(
        (u, n, x.at) for (u, n), x in platform.deletes.items())
    events = client.query("SELECT user_id, event_id, action, api_key_id, declared_by "
                          "FROM keypulse.api_key_events FINAL").result_rows
    assert sorted(events) == sorted(
        (u, e, str(x.action), x.api_key_id, str(x.declared_by))
        for (u, e), x in platform.key_events.items())
    for user in platform.users():
        assert client.command(unread_sql(user, "keypulse.")) == platform.unread(user), user


def test_records_from_kafka_reach_their_tables_once_and_junk_nowhere(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    p = Platform()
    # Refused first, each followed by a valid record on its partition (same key), so once
    # the valid ones are stored the refused ones were read.
    p.raw(topics.NOTIFICATIONS, b"alice", b"not json")
    p.raw(topics.NOTIFICATIONS, b"alice", b'{"kind": "read", "user_id": "alice"}')
    p.raw(topics.NOTIFICATIONS, b"alice", None)
    planted = Notification(notification_id="planted", user_id="alice",
                           type=NotificationType.ERROR, template="announcement",
                           title="pay here", message="", created_at=p.at())
    p.raw(topics.NOTIFICATIONS, b"mallory", msgspec.json.encode(planted))
    p.raw(topics.NOTIFICATIONS, b"*", msgspec.json.encode(
        NotificationRead(notification_id="s1", user_id="*", read=True, at=p.at())))
    # Stored by the pipeline's own sink before it published it: not inserted again.
    stored = msgspec.structs.replace(planted, notification_id="stored", user_id="bob")
    p.raw(topics.NOTIFICATIONS, b"bob", msgspec.json.encode(stored), [(STORED_HEADER, b"1")])
    p.raw(topics.APIKEY_EVENTS, b"alice", b'{"action": "exploded"}')
    p.raw(topics.APIKEY_EVENTS, b"mallory", msgspec.json.encode(ApiKeyEvent(
        action=ApiKeyAction.DELETED, user_id="alice", api_key_id="k", service="openai",
        at=p.at(), event_id="planted")))

    for nid in ("n1", "n2", "n3"):
        p.note("alice", nid)
    p.note("*", "s1")  # system-wide: one row, everybody's history
    p.note("bob", "b1")
    p.read("alice", "n1")
    p.read("alice", "n2")
    p.read("alice", "n2", flag=False)  # unread again: the last change wins
    p.read("alice", "s1")
    p.read("bob", "s1")
    p.read("mallory", "s1")
    p.delete("alice", "n3")
    p.delete("bob", "b1")
    p.key_event("alice", "e1", ApiKeyAction.CREATED)
    p.key_event("alice", "e2", ApiKeyAction.ROTATED)
    p.key_event("bob", "e3", ApiKeyAction.DELETED)
    p.key_event("mallory", "e4", ApiKeyAction.CREATED)

    run = RunProcess(kafka_settings, tmp_path)
    run.start()
    try:
        run.wait_healthy()
        p.send(kafka_settings)
        wait_for_counts(run, p.counts())
        assert live_unread(run, p.users()) == {"alice": 1, "bob": 0, "mallory": 0}
        assert run.stop() == 0
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.kill9()
    with embedded(tmp_path / "clickhouse") as client:
        assert_tables(client, p)
        # Stored once: without FINAL too, one row per message (no replay happened here).
        for table, want in (("notifications", len(p.notes)),
                            ("notification_reads", p.read_messages),
                            ("notification_deletes", len(p.deletes)),
                            ("api_key_events", len(p.key_events))):
            assert client.command(f"SELECT count() FROM keypulse.{table}") == want, table
        planted_rows = client.command(
            "SELECT count() FROM keypulse.notifications WHERE notification_id IN "
            "('planted', 'stored')")
        assert planted_rows == 0
        assert client.command("SELECT count() FROM keypulse.api_key_events "
                              "WHERE event_id = 'planted'") == 0
        assert client.command("SELECT count() FROM keypulse.notification_reads "
                              "WHERE user_id = '*'") == 0


def test_the_sink_stores_records_without_publishing_and_dead_letters_what_it_cannot_store(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Records from Kafka are stored, never published again; a table the engine refuses
    dead-letters its batch (storage_error) while the others go in; the pipeline's own
    notifications are published marked as stored, so the records input reads past them."""
    p = Platform()
    p.note("alice", "from-kafka")
    p.read("alice", "from-kafka")
    p.key_event("alice", "e1", ApiKeyAction.CREATED)
    own = msgspec.structs.replace(p.notes["alice", "from-kafka"], notification_id="own")
    out = PartitionOutput.empty()
    out.stored_notifications.extend(p.notes.values())
    out.notification_reads.extend(p.reads.values())
    out.api_key_events.extend(p.key_events.values())
    out.notifications.append(own)
    metrics = PipelineMetrics()
    db = kafka_settings.clickhouse_database
    with embedded(tmp_path / "ch") as client:
        migrate(client, kafka_settings, progress=lambda _line: None)
        sink = OutputSink(lambda: client, producer_config(kafka_settings), kafka_settings.topic,
                          db, max_age_s=3600, insert_attempts=2, retry_backoff_s=0,
                          metrics=metrics)
        part = sink.build_part("output", "writer-0", None)
        client.command(f"RENAME TABLE {db}.notification_reads TO {db}.notification_reads_away")
        try:
            part.write_batch([out])
            part.snapshot()  # writes what is buffered; would raise if the writer had failed
        finally:
            part.close()
            client.command(f"RENAME TABLE {db}.notification_reads_away TO "
                           f"{db}.notification_reads")
        stored = client.query(f"SELECT notification_id FROM {db}.notifications FINAL "
                              "ORDER BY notification_id").result_rows
        assert stored == [("from-kafka",), ("own",)]
        assert client.command(f"SELECT count() FROM {db}.api_key_events FINAL") == 1
        assert client.command(f"SELECT count() FROM {db}.notification_reads") == 0
    assert metrics.storage_dead_lettered == 1
    [dead] = read_all(kafka_settings, topics.USAGE_EVENTS_DLQ, 1)
    headers = dict(dead.headers() or [])
    assert headers["keypulse.reason"] == b"storage_error"
    assert headers["keypulse.table"] == f"{db}.notification_reads".encode()
    assert msgspec.json.decode(dead.value(), type=NotificationRead) == p.reads[
        "alice", "from-kafka"]
    published = read_all(kafka_settings, topics.NOTIFICATIONS, 1)
    assert [(m.key(), dict(m.headers() or [])) for m in published] == [
        (b"alice", {STORED_HEADER: b"1"})]
    assert msgspec.json.decode(published[0].value(), type=Notification) == own


def read_all(settings: Settings, topic: str, count: int, timeout: float = 10) -> list[Any]:
    """Every record of `topic`, expecting `count`: waits for them, then a little more for
    any that should not be there."""
    consumer = Consumer(consumer_config(settings, group_id="test-records"))
    name = settings.topic(topic)
    parts = consumer.list_topics(name, timeout=10).topics[name].partitions
    consumer.assign([TopicPartition(name, part, 0) for part in parts])
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    while time.monotonic() < deadline:
        got += [m for m in consumer.consume(100, timeout=0.2) if m.error() is None]
        if len(got) >= count:
            quiet_until = quiet_until or time.monotonic() + 1.0
            if time.monotonic() > quiet_until:
                break
    consumer.close()
    return got
