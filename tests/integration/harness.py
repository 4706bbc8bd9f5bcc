"""Helpers for integration tests: a pipeline process, an embedded ClickHouse, Kafka I/O."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Producer, TopicPartition

from core.kafka import consumer_config, producer_config
from core.kafka import produce as kafka_produce
from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def embedded(path: Path) -> Iterator[Client]:
    """Open the embedded engine at `path` for the block (one path per process at a time)."""
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    try:
        yield client
    finally:
        client.close()


class PipelineProcess:
    """`keypulse pipeline` in a child process with the test's settings."""

    def __init__(
        self, settings: Settings, data_dir: Path, epoch_seconds: float = 1.0, **env: str
    ) -> None:
        self.epoch_seconds = epoch_seconds
        self.env = {
            **os.environ,
            "KEYPULSE_DEV": "1",
            "KEYPULSE_DATA_DIR": str(data_dir),
            "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix,
            "KEYPULSE_CLICKHOUSE_DSN": "",
            **env,
        }
        self.log = data_dir / "pipeline.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "keypulse.cli",
                    "pipeline",
                    "--epoch-seconds",
                    str(self.epoch_seconds),
                ],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"pipeline exited {self.proc.returncode}:\n" + self.log.read_text()[-4000:]
            )


def produce(settings: Settings, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer(producer_config(settings))
    for key, value in messages:
        kafka_produce(producer, settings.topic(topic), value, key)
    assert producer.flush(30) == 0


class TopicReader:
    """Reads a topic from the beginning, all partitions, without a consumer group."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer(consumer_config(settings, group_id="test-reader"))
        name = settings.topic(topic)
        partitions = self.consumer.list_topics(name, timeout=10).topics[name].partitions
        self.consumer.assign([TopicPartition(name, p, 0) for p in partitions])
        self.messages: list[Any] = []

    def read_until(
        self,
        done: Callable[[list[Any]], bool],
        timeout: float,
        check: Callable[[], None] = lambda: None,
    ) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out with {len(self.messages)} messages")
            check()
            for message in self.consumer.consume(1000, timeout=0.5):
                if message.error() is None:
                    self.messages.append(message)
        return self.messages

    def close(self) -> None:
        self.consumer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunProcess(PipelineProcess):
    """`keypulse run` (pipeline + HTTP API + bridge) in a child process on a free port."""

    def __init__(
        self, settings: Settings, data_dir: Path, epoch_seconds: float = 1.0, **env: str
    ) -> None:
        super().__init__(settings, data_dir, epoch_seconds, **env)
        self.port = free_port()
        self.log = data_dir / "run.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "keypulse.cli", "run", "--host", "127.0.0.1",
                 "--port", str(self.port), "--epoch-seconds", str(self.epoch_seconds)],
                env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET `path` on the process's HTTP port: (status, body); (0, b"") when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except OSError:
            return 0, b""

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.get("/healthz")[0] != 200:
            self.assert_alive()
            if time.monotonic() > deadline:
                raise AssertionError("keypulse run never became healthy:\n"
                                     + self.log.read_text()[-4000:])
            time.sleep(0.2)
