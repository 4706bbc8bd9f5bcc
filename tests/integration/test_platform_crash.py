"""Notifications and reads survive kill -9 of `keypulse run` with nothing lost or doubled.

Notifications, read-state changes, deletions and API-key events go to Kafka as the bridge and
the API produce them: some while `keypulse run` is up, some while it is down after a
`kill -9`. The first run never snapshots (a one-hour epoch), so its restart replays every
record it had already stored; the second snapshots every second and is killed too, so the
third resumes from its snapshot and replays what came after it. In the end each record is
in ClickHouse once (FINAL), each read state is the last change's, and the counts the API
reads are exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core import topics
from core.settings import Settings
from schemas.api_keys import ApiKeyAction
from tests.integration.harness import RunProcess, embedded
from tests.integration.test_platform_records import (
    Platform,
    assert_tables,
    live_unread,
    wait_for_counts,
)

pytestmark = pytest.mark.integration

USERS = ("ana", "ben", "cy")


def first_wave(p: Platform) -> None:
    for user in USERS:
        for i in range(8):
            p.note(user, f"{user}-n{i}")
        for i in range(0, 8, 2):
            p.read(user, f"{user}-n{i}")
        p.delete(user, f"{user}-n7")
        p.key_event(user, f"{user}-e1", ApiKeyAction.CREATED)
    p.note("*", "incident-1")
    p.read("ana", "incident-1")


def while_down(p: Platform) -> None:
    for user in USERS:
        p.note(user, f"{user}-late")
        p.read(user, f"{user}-n0", flag=False)  # unread again
        p.read(user, f"{user}-n1")
        p.delete(user, f"{user}-n2")  # read, then deleted: gone from the history
        p.key_event(user, f"{user}-e2", ApiKeyAction.ROTATED)
    p.note("*", "announcement-1")
    p.read("ben", "announcement-1")
    p.read("ana", "incident-1", flag=False)


def after_restart(p: Platform) -> None:
    for user in USERS:
        p.note(user, f"{user}-live")
        p.read(user, f"{user}-late")
        p.read(user, f"{user}-n0")  # read once more
        p.key_event(user, f"{user}-e3", ApiKeyAction.DELETED)
    p.delete("cy", "announcement-1")


def last_wave(p: Platform) -> None:
    for user in USERS:
        p.read(user, f"{user}-live")
        p.read(user, f"{user}-n3")
    p.note("*", "announcement-2")


def test_notifications_and_reads_survive_kill_9_with_nothing_lost_or_doubled(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    p = Platform()
    runs: list[RunProcess] = []
    try:
        crashed = RunProcess(kafka_settings, tmp_path, epoch_seconds=3600)
        runs.append(crashed)
        crashed.start()
        crashed.wait_healthy()
        first_wave(p)
        p.send(kafka_settings)
        wait_for_counts(crashed, p.counts())  # stored, and no snapshot taken yet
        crashed.kill9()

        while_down(p)
        p.send(kafka_settings)

        restarted = RunProcess(kafka_settings, tmp_path, epoch_seconds=1)
        runs.append(restarted)
        restarted.start()
        restarted.wait_healthy()
        wait_for_counts(restarted, p.counts())
        after_restart(p)
        p.send(kafka_settings)
        wait_for_counts(restarted, p.counts())
        restarted.kill9()  # this time after snapshots: resumed from their offsets

        last_wave(p)
        p.send(kafka_settings)
        final = RunProcess(kafka_settings, tmp_path, epoch_seconds=1)
        runs.append(final)
        final.start()
        final.wait_healthy()
        wait_for_counts(final, p.counts())
        assert live_unread(final, set(USERS)) == {u: p.unread(u) for u in USERS}
        assert final.stop() == 0
    finally:
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                run.kill9()
    assert {u: p.unread(u) for u in USERS} == {"ana": 4, "ben": 3, "cy": 3}
    # The first restart read both topics from the beginning (no snapshot: a full replay),
    # the second from the offsets of its last snapshot.
    log = (tmp_path / "run.log").read_text()
    for topic in (topics.NOTIFICATIONS, topics.APIKEY_EVENTS):
        name = kafka_settings.topic(topic)
        assert log.count(f"reading {name}[0] from the beginning") == 2, topic
        assert log.count(f"reading {name}[0] from offset") == 1, topic
    with embedded(tmp_path / "clickhouse") as client:
        assert_tables(client, p)
