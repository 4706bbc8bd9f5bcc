"""`POST /v1/events` against the real broker: a 202 means the accepted events are on
`usage.events` already (confirmed, not merely queued), keyed by user_id, and the rejected ones
are not."""

from __future__ import annotations

import gzip
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
from fastapi.testclient import TestClient

from api import create_app
from api.ingest import EventProducer
from core.auth import mint_token
from core.settings import Settings
from tests.api.live import read_topic

pytestmark = pytest.mark.integration


def _event(user: str, i: int, **changes: object) -> dict[str, object]:
    found: dict[str, object] = {
        "event_id": f"e{i}", "ts": int(time.time() * 1000), "user_id": user,
        "api_key_id": "k1", "service": "openai", "status_code": 200, "latency_ms": 3.0}
    found.update(changes)
    return found


def test_accepted_events_are_on_the_topic_keyed_by_user_and_rejected_ones_are_not(
        kafka_settings: Settings) -> None:
    ingest = mint_token(kafka_settings, "collector", roles=("ingest",))
    user = mint_token(kafka_settings, "user-1", roles=("user",))
    with TestClient(create_app(kafka_settings)) as client:
        batch = [_event("user-1", 0), _event("user-2", 1), _event("user-3", 2, status_code=42),
                 _event("user-2", 3)]
        first = client.post("/v1/events", content=msgspec.json.encode(batch),
                            headers={"Authorization": f"Bearer {ingest}"})
        assert first.status_code == 202
        assert first.json()["accepted"] == 3
        assert [r["index"] for r in first.json()["rejected"]] == [2]
        second = client.post(
            "/v1/events", headers={"Authorization": f"Bearer {user}", "Content-Encoding": "gzip"},
            content=gzip.compress(msgspec.json.encode(
                {"events": [_event("user-1", 4), _event("user-9", 5)]})))
        assert second.status_code == 202
        assert second.json()["accepted"] == 1
    on_topic = read_topic(kafka_settings)  # right after the 202s: confirmed means there
    found = sorted((key, msgspec.json.decode(value)["event_id"])
                   for key, value in on_topic if key is not None and value is not None)
    assert found == [(b"user-1", "e0"), (b"user-1", "e4"), (b"user-2", "e1"), (b"user-2", "e3")]
    assert len(on_topic) == 4


def test_concurrent_batches_are_each_answered_once_all_of_theirs_are_confirmed(
        kafka_settings: Settings) -> None:
    """One producer, several requests in flight on worker threads: each `send` returns with
    its own batch's reports, whichever thread's poll served them."""
    producer = EventProducer(kafka_settings)
    batches = [[(f"user-{b}".encode(), msgspec.json.encode(_event(f"user-{b}", i)))
                for i in range(size)] for b, size in enumerate((1, 250, 40))]
    try:
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(producer.send, batches)) == [None, None, None]
    finally:
        producer.close()
    assert len(read_topic(kafka_settings)) == 291
