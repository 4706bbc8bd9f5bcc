"""The local broker for real: start, topics, a keyed round trip, the jars it runs from."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer

from core.errors import ServiceError
from core.kafka import consumer_config, producer_config
from core.settings import Settings
from core.topics import ALERT_RULES, TOPICS, USAGE_EVENTS
from infra.kafka import launcher


def _record(msg: Message) -> tuple[int, tuple[bytes, bytes]]:
    partition, key, value = msg.partition(), msg.key(), msg.value()
    assert partition is not None and isinstance(key, bytes) and isinstance(value, bytes)
    return partition, (key, value)


def test_round_trip_keeps_keys_values_and_order_per_partition(kafka_settings: Settings) -> None:
    topic = kafka_settings.topic(USAGE_EVENTS)
    sent: list[tuple[bytes, bytes]] = [
        (f"user-{i % 13}".encode(), f'{{"seq": {i}}}'.encode()) for i in range(500)
    ]
    delivered: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            partition, record = _record(msg)
            delivered[partition].append(record)

    producer = Producer(producer_config(kafka_settings))
    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert errors == []
    assert sum(len(batch) for batch in delivered.values()) == len(sent)

    consumer = Consumer(consumer_config(kafka_settings, group_id=f"test-{uuid.uuid4().hex[:8]}"))
    received: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 60
        while sum(map(len, received.values())) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            partition, record = _record(msg)
            received[partition].append(record)
    finally:
        consumer.close()

    assert dict(received) == dict(delivered)  # same messages, same order in every partition
    for partition, batch in received.items():  # producer order kept within a partition
        in_partition = set(batch)
        expected = [record for record in sent if record in in_partition]
        assert batch == expected, partition
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    for partition, batch in received.items():
        for key, _ in batch:
            partitions_of_key[key].add(partition)
    assert all(len(p) == 1 for p in partitions_of_key.values())  # one key, one partition
    assert len(received) > 1  # 13 keys spread over several partitions


def test_topics_exist_with_partitions_and_config(kafka_settings: Settings) -> None:
    admin_topics = launcher._admin(kafka_settings).list_topics(timeout=10).topics
    for spec in TOPICS:
        name = kafka_settings.topic(spec.name)
        assert name in admin_topics
        expected = kafka_settings.topic_partitions if spec.partitioned else 1
        assert len(admin_topics[name].partitions) == expected, name
    rules = launcher.describe_topic_configs(kafka_settings, kafka_settings.topic(ALERT_RULES))
    assert rules["cleanup.policy"] == "compact"
    events = launcher.describe_topic_configs(kafka_settings, kafka_settings.topic(USAGE_EVENTS))
    assert events["retention.ms"] == str(7 * 86_400_000)
    assert events["cleanup.policy"] == "delete"


def test_ensure_topics_is_idempotent(kafka_settings: Settings) -> None:
    assert launcher.ensure_topics(kafka_settings) == []


def test_start_twice_is_a_noop(kafka: Settings) -> None:
    assert launcher.is_up(kafka)
    message = launcher.start(kafka)
    assert "already running" in message
    assert kafka.kafka_bootstrap in message
    assert launcher.is_up(kafka)


def test_status_names_the_bootstrap(kafka: Settings) -> None:
    message = launcher.status(kafka)
    assert kafka.kafka_bootstrap in message
    assert "\n" not in message


def test_the_jar_cache_matches_the_manifest_and_a_tampered_copy_is_refused(
    tmp_path: Path,
) -> None:
    """The real cache (fetched with Maven if absent) passes; one flipped byte in a copy fails.

    The copy keeps each jar's size and mtime, so only hashing can tell them apart.
    """
    lib = launcher.ensure_jars()  # verifies the real cache against infra/kafka/jars.sha256
    assert {p.name for p in lib.glob("*.jar")} == set(launcher.read_manifest(launcher.MANIFEST))

    copy = tmp_path / "cache"
    shutil.copytree(lib, copy / "lib")  # real copies: the real cache is never written
    shutil.copy2(lib.parent / "lib.complete", copy / "lib.complete")
    assert launcher.ensure_jars(cache=copy) == copy / "lib"  # the untampered copy passes

    jar = copy / "lib" / launcher.BROKER_JAR
    before = jar.stat()
    with jar.open("r+b") as handle:
        handle.seek(before.st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(jar, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert jar.stat().st_size == before.st_size
    assert jar.stat().st_mtime_ns == before.st_mtime_ns

    with pytest.raises(ServiceError) as info:
        launcher.ensure_jars(cache=copy)
    assert str(info.value) == (
        f"Kafka jars in {copy / 'lib'} refused: {launcher.BROKER_JAR} does not match its "
        f"SHA-256 in jars.sha256; delete {copy} so the next start fetches them again"
    )
    launcher.verify_jars(lib)  # and the real cache is still intact
