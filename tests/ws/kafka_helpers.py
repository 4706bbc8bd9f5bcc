"""Messages and a producer for the bridge's integration tests (real broker)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
from confluent_kafka import Producer

from core.kafka import producer_config
from core.settings import Settings
from schemas.alerts import Alert, AlertState, Metric, Op, Severity
from schemas.api_keys import ApiKeyAction, ApiKeyEvent
from schemas.notifications import Notification, NotificationType
from schemas.stats import StatsRecord

T0 = datetime(2024, 5, 1, tzinfo=UTC)
_enc = msgspec.json.Encoder()


def stats(user: str, service: str = "openai", window: int = 0, requests: int = 10) -> bytes:
    start = T0 + timedelta(seconds=10 * window)
    return _enc.encode(StatsRecord(
        user_id=user, service=service, window_start=start,
        window_end=start + timedelta(seconds=10), window_seconds=10, requests=requests,
        successes=requests, client_errors=0, server_errors=0, success_rate=1.0, error_rate=0.0,
        server_error_rate=0.0, latency_avg_ms=1, latency_p50_ms=1, latency_p95_ms=1,
        latency_p99_ms=1, latency_max_ms=1, tokens_in=0, tokens_out=0, cost_usd=0))


def alert(user: str, n: int = 0) -> bytes:
    return _enc.encode(Alert(
        alert_id=f"a-{user}-{n}", rule_id="r1", rule_name="errors", user_id=user,
        service="openai", metric=Metric.ERROR_RATE, op=Op.GT, threshold=0.05, value=0.5,
        severity=Severity.CRITICAL, state=AlertState.FIRING, window_start=T0, window_end=T0,
        fired_at=T0, message=f"alert {n}"))


def notification(user: str, n: int = 0, message: str = "m", blob: str = "") -> bytes:
    data = {"n": str(n), "blob": blob} if blob else {"n": str(n)}
    return _enc.encode(Notification(
        notification_id=f"n-{user}-{n}", user_id=user, type=NotificationType.INFO,
        template="t", title=f"note {n}", message=message, created_at=T0, data=data))


def apikey(user: str, key_id: str = "k1") -> bytes:
    return _enc.encode(ApiKeyEvent(action=ApiKeyAction.CREATED, user_id=user, api_key_id=key_id,
                                   service="openai", name="prod", at=T0))


def usage(user: str, n: int = 0) -> bytes:
    return _enc.encode({"event_id": uuid.uuid4().hex, "ts": 1_714_521_600_000 + n,
                        "user_id": user, "api_key_id": "k1", "service": "openai",
                        "status_code": 200, "latency_ms": 5})


class TestProducer:
    __test__ = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self.partitions: list[tuple[str, int, int]] = []
        self.ends: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset

    def send(self, topic: str, key: str, value: bytes) -> None:
        def delivered(err, msg) -> None:  # type: ignore[no-untyped-def]
            assert err is None, err
            self.partitions.append((msg.key().decode(), msg.partition(), msg.offset()))
            where = (msg.topic(), msg.partition())
            self.ends[where] = max(self.ends.get(where, 0), msg.offset() + 1)

        self.producer.produce(self.settings.topic(topic), key=key.encode(), value=value,
                              on_delivery=delivered)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0
