"""The one settings object: validation, derived values, and the JWT secret rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import DEV_JWT_SECRET, load
from ws_bridge import create_bridge

STRONG = "x" * 16 + "y" * 16


@pytest.mark.parametrize("secret", ["", "changeme", "secret", DEV_JWT_SECRET, "short-but-real"])
def test_a_missing_placeholder_or_short_secret_is_refused_outside_dev(secret: str) -> None:
    settings = load(dev=False, jwt_secret=secret)
    with pytest.raises(ConfigError, match="KEYPULSE_JWT_SECRET"):
        settings.jwt_key  # noqa: B018
    with pytest.raises(ConfigError, match="KEYPULSE_JWT_SECRET"):
        create_bridge(settings, kafka=False)  # a server that verifies tokens will not start


def test_dev_mode_has_a_built_in_secret_and_a_real_one_is_used_as_is() -> None:
    assert load(dev=True).jwt_key == DEV_JWT_SECRET
    assert load(dev=False, jwt_secret=STRONG).jwt_key == STRONG


def test_commands_without_tokens_do_not_need_the_secret() -> None:
    settings = load(dev=False, jwt_secret="")
    assert settings.dsn.startswith("chdb://")  # migrate, kafka, gen, pipeline still work


def test_derived_values(tmp_path: Path) -> None:
    settings = load(dev=True, data_dir=tmp_path, kafka_bootstrap="kafka:29092",
                    topic_prefix="t1.", ws_allowed_origins="https://a.example, https://b.example")
    assert settings.dsn == f"chdb://{(tmp_path / 'clickhouse').resolve()}"
    assert settings.embedded
    assert settings.bootstrap_host_port == ("kafka", 29092)
    assert settings.controller_port == 29093
    assert settings.topic("usage.events") == "t1.usage.events"
    assert settings.ws_allowed_origins == ["https://a.example", "https://b.example"]
    server = load(dev=True, clickhouse_dsn="http://u:p@ch:8123/keypulse")
    assert not server.embedded


@pytest.mark.parametrize(("field", "value", "words"), [
    ("kafka_bootstrap", "nohostport", "host:port"),
    ("clickhouse_dsn", "mysql://x", "chdb://, http:// or https://"),
    ("window_seconds", 0, "window_seconds"),
    ("topic_prefix", "bad prefix!", "topic_prefix"),
])
def test_invalid_values_are_refused_with_the_field_named(field: str, value: object,
                                                        words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load(dev=True, **{field: value})
