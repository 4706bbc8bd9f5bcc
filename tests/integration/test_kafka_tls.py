"""Brokers of this module's own, started as `keypulse kafka start --tls` / `--sasl` do, reached
with real clients configured by core.kafka (docs/kafka-security.md).

The TLS broker listens on 127.0.0.1:19192 (controller 19193), the SASL one on 19196 (19197),
each with a data dir under the test's tmp; both are stopped in fixture teardown.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._acl import AclBindingFilter, AclOperation, AclPermissionType
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType
from pydantic import SecretStr

from core import topics
from core.kafka import admin_config, consumer_config, producer_config
from core.settings import Settings, load
from infra.kafka import acls, launcher

TLS_BOOTSTRAP = "127.0.0.1:19192"
SASL_BOOTSTRAP = "127.0.0.1:19196"
ADMIN = ("keypulse-admin", "admin=pw-for-the-test-1")
QUIET = logging.getLogger("tests.kafka_tls.rdkafka")  # librdkafka's refusals, off stderr
QUIET.propagate = False


def _broker_settings(data_dir: Path, bootstrap: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "dev": True,
        "data_dir": data_dir,
        "kafka_bootstrap": bootstrap,
        "kafka_controller_port": 0,
        "topic_prefix": "",
        "topic_partitions": 2,
        "kafka_security_protocol": "PLAINTEXT",
        "kafka_sasl_username": "",
        "kafka_sasl_password": "",
        "kafka_ssl_ca_file": None,
        "kafka_ssl_check_hostname": True,
    }
    return load(**(base | overrides))


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Client settings (SSL, the broker's CA) for a `--tls` broker of this module's own."""
    settings = _broker_settings(tmp_path_factory.mktemp("tls"), TLS_BOOTSTRAP)
    message = launcher.start(settings, wait_seconds=90, tls_listener=True)
    try:
        ca = launcher.kafka_dir(settings) / "tls" / "ca.pem"
        assert f"KEYPULSE_KAFKA_SSL_CA_FILE={ca}" in message
        yield settings.model_copy(
            update={"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": ca}
        )
    finally:
        launcher.stop(settings)


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Admin client settings for a `--sasl` broker whose ACLs and principals were applied."""
    settings = _broker_settings(
        tmp_path_factory.mktemp("sasl"),
        SASL_BOOTSTRAP,
        kafka_sasl_username=ADMIN[0],
        kafka_sasl_password=ADMIN[1],
    )
    launcher.start(settings, wait_seconds=90, sasl=True)
    try:
        admin = settings.model_copy(
            update={
                "kafka_security_protocol": "SASL_SSL",
                "kafka_ssl_ca_file": launcher.kafka_dir(settings) / "tls" / "ca.pem",
            }
        )
        passwords = tmp_path_factory.mktemp("passwords")
        for role in acls.ROLES:
            (passwords / role.name).write_text(f"{role.name}-password-for-the-test\n")
        assert acls.apply(admin, password_dir=passwords).startswith(
            f"applied {len(acls.grants())} ACLs for 3 principals"
        )
        yield admin
    finally:
        launcher.stop(settings)


def _as(settings: Settings, user: str, password: str | None = None) -> Settings:
    return settings.model_copy(
        update={
            "kafka_sasl_username": user,
            "kafka_sasl_password": SecretStr(password or f"{user}-password-for-the-test"),
        }
    )


def _produce(settings: Settings, topic: str, value: bytes) -> tuple[KafkaError | None, int]:
    """Produce one record; (the delivery error or None, its offset)."""
    producer = Producer(producer_config(settings, logger=QUIET, **{"message.timeout.ms": 10_000}))
    outcome: list[tuple[KafkaError | None, int]] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        outcome.append((err, msg.offset() or 0))

    producer.produce(topic, value, b"user-1", on_delivery=delivered)
    producer.flush(15)
    assert len(outcome) == 1
    return outcome[0]


def _read(settings: Settings, topic: str, offset: int, group: str) -> bytes | None:
    """The value at `offset` of `topic` (partition of key user-1), read as the services do."""
    consumer = Consumer(consumer_config(settings, group_id=group, logger=QUIET))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for partition in partitions:
            consumer.assign([TopicPartition(topic, partition, offset)])
            message = consumer.poll(10)
            if message is not None and message.error() is None and message.key() == b"user-1":
                return message.value()
        return None
    finally:
        consumer.close()


def _refused(settings: Settings) -> bool:
    """True if a metadata request through `settings` gets no answer within 3 s."""
    admin = AdminClient(admin_config(settings, logger=QUIET))
    try:
        admin.list_topics(timeout=3)
    except KafkaException:
        return True
    return False


# -- TLS -----------------------------------------------------------------------------------


def test_produce_and_consume_over_tls(tls_broker: Settings) -> None:
    value = uuid.uuid4().bytes
    error, offset = _produce(tls_broker, topics.USAGE_EVENTS, value)
    assert error is None
    assert _read(tls_broker, topics.USAGE_EVENTS, offset, "keypulse-tls-test") == value


def test_a_client_without_the_ca_is_refused(tls_broker: Settings) -> None:
    assert not _refused(tls_broker)  # the same broker answers a client with the CA
    assert _refused(tls_broker.model_copy(update={"kafka_ssl_ca_file": None}))


def test_plaintext_to_the_tls_port_fails(tls_broker: Settings) -> None:
    assert _refused(tls_broker.model_copy(update={"kafka_security_protocol": "PLAINTEXT"}))


def test_start_again_finds_the_running_tls_broker(tls_broker: Settings) -> None:
    settings = tls_broker.model_copy(
        update={"kafka_security_protocol": "PLAINTEXT", "kafka_ssl_ca_file": None}
    )
    message = launcher.start(settings, tls_listener=True)
    assert message.startswith(f"Kafka already running at {TLS_BOOTSTRAP} (pid ")


def test_status_names_the_settings_a_tls_broker_needs(tls_broker: Settings) -> None:
    assert launcher.status(tls_broker).startswith(f"Kafka {launcher.KAFKA_VERSION} running: pid")
    plain = tls_broker.model_copy(
        update={"kafka_security_protocol": "PLAINTEXT", "kafka_ssl_ca_file": None}
    )
    assert "started with a TLS listener: set KEYPULSE_KAFKA_SECURITY_PROTOCOL" in (
        launcher.status(plain)
    )


# -- SASL and ACLs ---------------------------------------------------------------------------


def test_only_the_api_may_write_alert_rules(sasl_broker: Settings) -> None:
    error, _ = _produce(_as(sasl_broker, "keypulse-api"), topics.ALERT_RULES, b"{}")
    assert error is None
    error, _ = _produce(_as(sasl_broker, "keypulse-pipeline"), topics.ALERT_RULES, b"{}")
    assert error is not None
    assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_a_wrong_password_is_refused(sasl_broker: Settings) -> None:
    assert not _refused(_as(sasl_broker, "keypulse-api"))
    assert _refused(_as(sasl_broker, "keypulse-api", "not-the-password-at-all"))
    assert _refused(sasl_broker.model_copy(update={"kafka_security_protocol": "SSL"}))


def test_the_bridge_reads_what_the_api_wrote(sasl_broker: Settings) -> None:
    value = uuid.uuid4().bytes
    error, offset = _produce(_as(sasl_broker, "keypulse-api"), topics.USAGE_EVENTS, value)
    assert error is None
    ws = _as(sasl_broker, "keypulse-ws")
    assert _read(ws, topics.USAGE_EVENTS, offset, f"keypulse-ws-{uuid.uuid4().hex[:12]}") == value
    # the bridge may not write what only the pipeline writes
    error, _ = _produce(ws, topics.USAGE_STATS, b"{}")
    assert error is not None
    assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_applying_again_leaves_the_same_acls(sasl_broker: Settings) -> None:
    acls.apply(sasl_broker)
    admin = AdminClient(admin_config(sasl_broker, logger=QUIET))
    anything: Any = None  # a filter's None matches every value (typed `str` by the stubs)
    everything = AclBindingFilter(
        ResourceType.ANY,
        anything,
        ResourcePatternType.ANY,
        anything,
        anything,
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    bindings = admin.describe_acls(everything, request_timeout=10).result(timeout=15)
    found = {
        (b.principal, b.operation.name, b.restype.name, b.name, b.resource_pattern_type.name)
        for b in bindings
    }
    assert len(bindings) == len(found)
    assert found == {
        (g.principal, g.operation, g.resource, g.name, g.pattern) for g in acls.grants()
    }
