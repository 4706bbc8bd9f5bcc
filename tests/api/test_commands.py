"""`keypulse api` / `ws` / `run` as processes: dev mode binds to loopback only, no token in
any log line, and a held embedded store is one clear line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from clickhouse_connect.driver.client import Client

from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPULSE_")}
    return {**env, "KEYPULSE_DEV": "1", "KEYPULSE_DATA_DIR": str(data_dir),
            "KEYPULSE_LOG_LEVEL": "INFO", **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _keypulse(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "keypulse.cli", *args], env=env,
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _wait_until_serving(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"not serving on {port}:\n{log.read_text()}")


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to SIGTERM (and reap) after the test."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize("command", ["api", "ws", "run"])
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10"])
def test_dev_mode_refuses_a_public_bind_in_one_line(command: str, host: str,
                                                    tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keypulse.cli", command, "--host", host],
        env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=60,
        check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"keypulse {command}: refusing to bind {host}: dev mode (KEYPULSE_DEV=1) signs with the "
        "public built-in JWT secret; bind 127.0.0.1, or set KEYPULSE_JWT_SECRET"]
    assert not (tmp_path / "clickhouse").exists()  # refused before anything was opened


@pytest.mark.integration  # the child opens the ClickHouse engine: invisible to the derived rule
def test_no_token_reaches_the_api_log(tmp_path: Path,
                                      stopped: list[subprocess.Popen[bytes]]) -> None:
    port, log = _free_port(), tmp_path / "api.log"
    proc = _keypulse("api", "--port", str(port), env=_env(tmp_path), log=log)
    stopped.append(proc)
    _wait_until_serving(proc, port, log)
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz?token=sekrit1").status_code == 200
    assert httpx.get(f"{base}/ws?token=sekrit2&x=1").status_code == 404
    assert httpx.get(f"{base}/nowhere?access_token=sekrit3").status_code == 404
    bearer = {"Authorization": "Bearer sekrit4"}
    assert httpx.get(f"{base}/v1/admin/tables", headers=bearer).status_code == 401
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    text = log.read_text()
    assert "sekrit" not in text
    assert '"GET /healthz?token=*** HTTP/1.1" 200' in text  # logged, redacted
    assert '"GET /ws?token=***&x=1 HTTP/1.1" 404' in text
    assert "dev mode: tokens are signed with the public built-in JWT secret" in text


def test_no_token_reaches_the_bridge_log(kafka_settings: Settings, tmp_path: Path,
                                         stopped: list[subprocess.Popen[bytes]]) -> None:
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    port, log = _free_port(), tmp_path / "ws.log"
    env = _env(tmp_path, KEYPULSE_KAFKA_BOOTSTRAP=kafka_settings.kafka_bootstrap,
               KEYPULSE_TOPIC_PREFIX=kafka_settings.topic_prefix)
    proc = _keypulse("ws", "--port", str(port), env=env, log=log)
    stopped.append(proc)
    _wait_until_serving(proc, port, log)
    for query in ("token=sekrit1", "access_token=sekrit2"):
        try:
            with connect(f"ws://127.0.0.1:{port}/ws?{query}", open_timeout=10) as ws:
                ws.recv(timeout=10)
        except (InvalidStatus, WebSocketException, TimeoutError):
            pass  # the bridge refuses tokens in the URL; the point is what got logged
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    text = log.read_text()
    assert "sekrit" not in text
    assert "/ws?token=***" in text  # uvicorn logged the socket, redacted


def test_api_on_a_held_embedded_store_says_so_and_exits(
    tmp_path: Path, clickhouse_engine: Client
) -> None:
    clickhouse_engine.command("SELECT 1")  # this process holds tmp_path/clickhouse
    store = (tmp_path / "clickhouse").resolve()
    done = subprocess.run(
        [sys.executable, "-m", "keypulse.cli", "api", "--port", str(_free_port())],
        env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=120,
        check=False)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[-1] == (
        f"keypulse api: the embedded store chdb://{store} is held by another process "
        "(keypulse run or pipeline): embedded, one process serves it all; use `keypulse run`, "
        "or a ClickHouse server (KEYPULSE_CLICKHOUSE_DSN=http://...)")
    assert "Traceback" not in done.stderr
