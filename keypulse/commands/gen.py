"""`keypulse gen`: emit realistic usage events to Kafka (an SDK stand-in and load generator).

Events come from `keypulse.traffic.TrafficGenerator`; key = user_id, topic `usage.events`
(with the configured prefix) unless `--topic` says otherwise. Runs until `--duration`
seconds or `--count` events, whichever comes first, or until SIGINT/SIGTERM; then flushes
the producer and prints a summary. Exit status 1 if any event was not delivered.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, TextIO

from core.errors import ConfigError, ServiceError
from core.kafka import admin_config, producer_config
from core.kafka import produce as kafka_produce
from core.settings import Settings

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.02
MAX_BATCH = 5_000
FLUSH_TIMEOUT_SECONDS = 30.0
METADATA_TIMEOUT_SECONDS = 5.0


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        msg = f"expected a share in [0, 1], got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or math.isinf(value):
        msg = f"expected a finite number >= 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"expected an integer >= 1, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=_non_negative, default=200.0,
                        help="events per second (default 200; 0 = as fast as possible)")
    parser.add_argument("--duration", type=_non_negative, default=None,
                        help="seconds to run (default: until Ctrl-C; 0 = forever)")
    parser.add_argument("--count", type=_positive_int, default=None,
                        help="stop after this many events")
    parser.add_argument("--users", type=_positive_int, default=50,
                        help="number of simulated users (default 50)")
    parser.add_argument("--services", default=None,
                        help="comma-separated services to draw from (default: the whole "
                             "catalogue: openai, anthropic, stripe, github, twilio, …)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed: the same seed gives the same users, keys and events")
    parser.add_argument("--incident", choices=("error-burst", "latency-spike"), default=None,
                        help="inject an incident for one user and service")
    parser.add_argument("--incident-user", default=None,
                        help="user_id of the incident (default: the busiest user)")
    parser.add_argument("--incident-service", default=None,
                        help="service of the incident (default: that user's main service)")
    parser.add_argument("--incident-start", type=_non_negative, default=10.0,
                        help="seconds after start when the incident begins (default 10)")
    parser.add_argument("--incident-duration", type=_non_negative, default=60.0,
                        help="incident length in seconds (default 60)")
    parser.add_argument("--malformed", type=_share, default=0.0,
                        help="share in [0, 1] of malformed events (default 0)")
    parser.add_argument("--ts-format", choices=("mixed", "ms", "rfc3339"), default="mixed",
                        help="ts as epoch ms, RFC 3339, or alternating (default mixed)")
    parser.add_argument("--topic", default=None,
                        help="topic to write to (default: usage.events with the topic prefix)")


class _Stop:
    """Set by SIGINT/SIGTERM; restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()


class _Progress:
    """One status line on stderr: redrawn in place on a TTY, else a line every few seconds."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.5 if self.tty else 5.0
        self.start = time.monotonic()
        self.last = self.start
        self.last_sent = 0

    def maybe(self, sent: int, delivered: int, errors: int, malformed: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        rate = (sent - self.last_sent) / (now - self.last)
        self.last, self.last_sent = now, sent
        line = (f"gen: {sent:,} sent ({malformed:,} malformed), {rate:,.0f} ev/s, "
                f"{delivered:,} delivered, {errors:,} delivery errors, "
                f"{now - self.start:,.0f} s")
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import KafkaError, KafkaException, Message, Producer
    from confluent_kafka.admin import AdminClient

    from keypulse.traffic import Incident, TrafficGenerator

    topic = args.topic or settings.topic("usage.events")
    services = [s.strip() for s in args.services.split(",") if s.strip()] if args.services else None
    try:
        gen = TrafficGenerator(args.seed, args.users, services, malformed=args.malformed,
                               ts_format=args.ts_format)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    start_ms = int(time.time() * 1000)
    if args.incident:
        default_user, default_service = gen.default_incident_target()
        user = args.incident_user or default_user
        if args.incident_service:
            service = args.incident_service
        elif user == default_user:
            service = default_service
        else:
            profile = next((u for u in gen.users if u.user_id == user), None)
            service = profile.services[0] if profile else default_service
        begin = start_ms + int(args.incident_start * 1000)
        incident = Incident(args.incident, user, service, begin,
                            begin + int(args.incident_duration * 1000))
        try:
            gen.add_incident(incident)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # Pre-flight with a quiet client: an unreachable broker is one clear line, not a
    # stream of librdkafka connection errors.
    admin = AdminClient(admin_config(settings, log_level=0))
    try:
        metadata = admin.list_topics(topic, timeout=METADATA_TIMEOUT_SECONDS)
    except KafkaException:
        msg = (f"Kafka at {settings.kafka_bootstrap} did not answer within "
               f"{METADATA_TIMEOUT_SECONDS:g} s (is it running? `keypulse kafka start`)")
        raise ServiceError(msg) from None
    topic_meta = metadata.topics.get(topic)
    if topic_meta is None or topic_meta.error is not None or not topic_meta.partitions:
        msg = (f"topic {topic!r} does not exist at {settings.kafka_bootstrap} "
               "(`keypulse kafka start` creates the topics)")
        raise ServiceError(msg)
    producer = Producer(producer_config(settings, **{"client.id": "keypulse-gen"}))

    delivered = 0
    errors = 0
    first_error: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        nonlocal delivered, errors
        if err is None:
            delivered += 1
        else:
            errors += 1
            if not first_error:
                first_error.append(str(err))

    limit = args.count
    deadline = (time.monotonic() + args.duration) if args.duration else math.inf
    rate = args.rate
    out = sys.stderr
    print(f"gen: {args.users} users → {topic} at {settings.kafka_bootstrap}, "
          f"{'max' if not rate else f'{rate:g}'} ev/s"
          + (f", incident {args.incident} for {incident.user_id}/{incident.service} "
             f"at +{args.incident_start:g}s for {args.incident_duration:g}s"
             if args.incident else ""),
          file=out, flush=True)
    progress = _Progress(out)
    poll = producer.poll
    sent = 0
    malformed = 0
    began = time.monotonic()
    with _Stop() as stop:
        while not stop.event.is_set():
            now = time.monotonic()
            if now >= deadline or (limit is not None and sent >= limit):
                break
            due = MAX_BATCH if not rate else min(MAX_BATCH, int((now - began) * rate) - sent)
            if limit is not None:
                due = min(due, limit - sent)
            if due <= 0:
                poll(0)
                progress.maybe(sent, delivered, errors, malformed)
                stop.event.wait(TICK_SECONDS)
                continue
            now_ms = int(time.time() * 1000)
            for key, value, kind in gen.labeled_events(due, now_ms):
                kafka_produce(producer, topic, value, key, on_delivery=on_delivery)
                sent += 1
                if kind is not None:
                    malformed += 1
            poll(0)
            progress.maybe(sent, delivered, errors, malformed)
        progress.done()
        remaining = producer.flush(FLUSH_TIMEOUT_SECONDS)
    elapsed = time.monotonic() - began
    errors += remaining
    if remaining:
        first_error.append(f"{remaining} still queued after {FLUSH_TIMEOUT_SECONDS:g} s")
    print(f"gen: sent {sent:,} events ({malformed:,} malformed) to {topic} in {elapsed:,.1f} s "
          f"({sent / elapsed if elapsed else 0:,.0f} ev/s); delivered {delivered:,}, "
          f"delivery errors {errors:,}" + (f" (first: {first_error[0]})" if first_error else ""),
          file=out, flush=True)
    return 1 if errors else 0
