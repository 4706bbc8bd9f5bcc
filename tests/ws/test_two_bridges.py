"""Two `keypulse ws` bridges behave as one: users' sockets split across two bridge processes
receive, per user, the same frames as on a single bridge, and never another user's.

Three bridges run as subprocesses on the real broker: A and B share the users (some users on
A only, some on B only, some with a socket on each), C serves every user alone. Each bridge
reads every partition (no consumer group), so one golden stream of stats, alerts,
notifications, API-key events and announcements reaches all three. A frame is compared
without its per-connection fields (`ts`, `seq`, `cursor`), per event kind in arrival order
(one user's records of one topic share a partition, so their order is fixed).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection

from core.settings import Settings
from tests.ws import kafka_helpers as kh
from tests.ws.harness import login, quiet

REPO = Path(__file__).resolve().parents[2]
USERS = ("u0", "u1", "u2", "u3", "u4", "u5")
# socket plan of the split pair: user → bridges (A, B) it has a socket on
SPLIT = {"u0": "A", "u1": "A", "u2": "B", "u3": "B", "u4": "AB", "u5": "AB"}
PER_CONNECTION = ("ts", "seq", "cursor")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BridgeProcess:
    """`keypulse ws` on a free port, in a child process with the test's settings."""

    def __init__(self, settings: Settings, secret: str, data_dir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.log = data_dir / f"ws-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPULSE_")}
        env |= {
            "KEYPULSE_DEV": "1",
            "KEYPULSE_JWT_SECRET": secret,
            "KEYPULSE_DATA_DIR": str(data_dir),
            "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix,
            "KEYPULSE_LOG_LEVEL": "INFO",
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "keypulse.cli",
                    "ws",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"bridge exited {self.proc.returncode}:\n" + self.log.read_text()[-3000:]
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/readyz", timeout=2
                ) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def golden_stream(producer: kh.TestProducer) -> dict[str, list[tuple[str, str]]]:
    """Produce the stream; per user, the (event, identity) of every frame it must receive."""
    want: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for n in range(12):
        for k, user in enumerate(USERS):
            service = ("openai", "stripe")[(n + k) % 2]
            producer.send(
                "usage.stats", user, kh.stats(user, service, window=n, requests=10 + n + k)
            )
            want[user].append(("usage_stats_update", f"{service}:{n}"))
            if n % 3 == k % 3:
                producer.send("usage.alerts", user, kh.alert(user, n))
                want[user].append(("usage_alert", f"a-{user}-{n}"))
            if n % 2 == k % 2:
                producer.send("notifications", user, kh.notification(user, n, f"for {user}"))
                want[user].append(("new_notification", f"n-{user}-{n}"))
            if n % 4 == 0:
                producer.send("apikey.events", user, kh.apikey(user, f"{user}-k{n}"))
                want[user].append(("api_key_update", f"{user}-k{n}"))
        if n % 4 == 1:
            producer.send("notifications", "*", kh.notification("*", n, "everyone"))
            for user in USERS:
                want[user].append(("system_notification", f"n-*-{n}"))
        # never delivered: a user with no socket, and records whose key and value disagree
        producer.send("usage.stats", "zed", kh.stats("zed", window=n))
        producer.send("usage.alerts", "u0", kh.alert("u1", 100 + n))
        producer.send("notifications", "u2", kh.notification("u3", 100 + n))
    producer.flush()
    return want


def identity(frame: dict[str, Any]) -> tuple[str, str]:
    event, data = frame["event"], frame["data"]
    if event == "usage_stats_update":
        start = datetime.fromisoformat(data["window_start"])
        return event, f"{data['service']}:{(start - kh.T0) // timedelta(seconds=10)}"
    if event == "usage_alert":
        return event, data["alert_id"]
    if event == "api_key_update":
        return event, data["api_key_id"]
    return event, data["notification_id"]


async def receive(ws: ClientConnection, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """`count` frames without their per-connection fields, then nothing more for a while."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        text = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        frame = json.loads(text)
        for key in PER_CONNECTION:
            frame.pop(key, None)
        out.append(frame)
    await quiet(ws, 0.5)
    return out


def by_kind(frames: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each event kind's frames in arrival order, as canonical JSON."""
    out: dict[str, list[str]] = defaultdict(list)
    for frame in frames:
        out[frame["event"]].append(json.dumps(frame, sort_keys=True))
    return dict(out)


def test_two_bridges_deliver_per_user_what_one_bridge_does(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    secret = secrets.token_urlsafe(32)
    settings = kafka_settings.model_copy(update={"jwt_secret": SecretStr(secret)})
    started = time.monotonic()
    bridges = {name: BridgeProcess(settings, secret, tmp_path, name) for name in "ABC"}
    try:
        for bridge in bridges.values():
            bridge.wait_ready()

        async def main() -> tuple[
            dict[tuple[str, str], list[dict[str, Any]]], dict[str, list[tuple[str, str]]]
        ]:
            sockets: dict[tuple[str, str], ClientConnection] = {}
            for user in USERS:
                for name in SPLIT[user] + "C":
                    ws, auth = await login(bridges[name].url, settings, user)
                    assert auth.user_id == user
                    sockets[user, name] = ws
            want = golden_stream(kh.TestProducer(settings))
            got = await asyncio.gather(
                *(receive(ws, len(want[user])) for (user, _), ws in sockets.items())
            )
            for ws in sockets.values():
                await ws.close()
            return dict(zip(sockets, got, strict=True)), want

        received, want = asyncio.run(main())
    finally:
        codes = [bridge.stop() for bridge in bridges.values()]
    elapsed = time.monotonic() - started
    assert len(received) == 14  # 4 sockets on A, 4 on B, 6 on C
    # per user: 12 stats, 4 alerts, 6 notifications, 3 API-key events, 3 announcements
    assert {len(want[u]) for u in USERS} == {28}
    for (user, name), frames in received.items():
        # the user's own frames, and announcements: no other user's data, nothing missing
        for frame in frames:
            if frame["event"] != "system_notification":
                assert frame["data"].get("user_id", user) == user, (user, name, frame)
        assert sorted(identity(f) for f in frames) == sorted(want[user]), (user, name)
        # the split pair gives each user exactly what the single bridge gives, in order
        assert by_kind(frames) == by_kind(received[user, "C"]), (user, name)
    assert sum(len(frames) for frames in received.values()) == sum(
        len(want[u]) * (len(SPLIT[u]) + 1) for u in USERS
    )
    assert codes == [0, 0, 0]
    assert elapsed < 120
