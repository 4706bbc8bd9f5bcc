"""Fixtures of the API tests: an app on dev settings, tokens, and a TestClient."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import create_app
from core.auth import mint_token
from core.clock import ManualClock
from core.settings import Settings, load


@pytest.fixture
def api_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load(dev=True, data_dir=tmp_path_factory.mktemp("api"),
                topic_prefix=f"a{uuid.uuid4().hex[:8]}.", kafka_bootstrap="127.0.0.1:1")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def app(api_settings: Settings, clock: ManualClock) -> FastAPI:
    return create_app(api_settings, clock=clock)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def token(api_settings: Settings, clock: ManualClock) -> Callable[..., str]:
    """`token(user, roles=(...), ttl=...)`: a token minted at the test clock's time."""

    def make(user: str = "user-1", roles: tuple[str, ...] = (), ttl: float = 3600) -> str:
        return mint_token(api_settings, user, roles=roles, ttl_seconds=ttl, clock=clock)

    return make
