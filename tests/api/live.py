"""An API app served for real, and what it put on Kafka: for tests that need a socket (HTTP
clients, the SDK) or the broker's own view of a topic.

    with LiveServer(app) as server: ...   uvicorn in a daemon thread; server.port, server.url
    read_topic(settings)                  every message now on usage.events, by its watermarks
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid

import uvicorn
from confluent_kafka import Consumer, TopicPartition
from fastapi import FastAPI

from core.kafka import consumer_config
from core.settings import Settings
from core.topics import USAGE_EVENTS


class LiveServer:
    """`app` served by uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def read_topic(settings: Settings, topic: str = USAGE_EVENTS
               ) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every message now on `topic`, read up to its watermarks: no waiting
    for more to arrive."""
    name = settings.topic(topic)
    consumer = Consumer(consumer_config(settings, group_id=f"test-{uuid.uuid4().hex[:8]}"))
    try:
        partitions = consumer.list_topics(name, timeout=10).topics[name].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                for p in partitions}
        expected = sum(high - low for low, high in ends.values())
        consumer.assign([TopicPartition(name, p, low) for p, (low, _) in ends.items()])
        found: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + 30
        while len(found) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                found.append((msg.key(), msg.value()))
        assert len(found) == expected
        return found
    finally:
        consumer.close()
