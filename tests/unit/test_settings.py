"""The one settings object: validation, derived values, and the JWT secret rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.auth import AuthError, mint_token, verify_token
from core.errors import ConfigError
from core.settings import DEV_JWT_SECRET, SECRET_SETTINGS, load
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


# -- secrets from files (KEYPULSE_<NAME>_FILE) --------------------------------------------------


@pytest.mark.parametrize("name", SECRET_SETTINGS)
def test_every_secret_setting_reads_a_file_without_its_trailing_newline(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    value = "http://u:p@db:8123/k" if name == "clickhouse_dsn" else STRONG
    secret_file = tmp_path / name
    secret_file.write_text(value + "\n")
    monkeypatch.delenv(f"KEYPULSE_{name.upper()}", raising=False)
    monkeypatch.setenv(f"KEYPULSE_{name.upper()}_FILE", str(secret_file))
    got = getattr(load(), name)
    assert (got if isinstance(got, str) else got.get_secret_value()) == value


def test_a_secret_and_its_file_together_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s").write_text(STRONG)
    monkeypatch.setenv("KEYPULSE_JWT_SECRET", STRONG)
    monkeypatch.setenv("KEYPULSE_JWT_SECRET_FILE", str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="KEYPULSE_JWT_SECRET or KEYPULSE_JWT_SECRET_FILE"):
        load()


def test_an_unreadable_secret_file_is_named_and_its_content_never_shown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYPULSE_KAFKA_SASL_PASSWORD", raising=False)
    monkeypatch.setenv("KEYPULSE_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="KEYPULSE_KAFKA_SASL_PASSWORD_FILE: cannot read"):
        load()


# -- JWT secret rotation: the previous secret is accepted, never used to sign ------------------


def test_during_a_rotation_tokens_of_both_secrets_verify_and_new_ones_use_the_new() -> None:
    old, new = "o" * 40, "n" * 40
    before = load(dev=False, jwt_secret=old)
    during = load(dev=False, jwt_secret=new, jwt_previous_secret=old)
    after = load(dev=False, jwt_secret=new)
    old_token = mint_token(before, "u1")
    new_token = mint_token(during, "u1")
    assert verify_token(during, old_token).user_id == "u1"
    assert verify_token(during, new_token).user_id == "u1"
    assert verify_token(after, new_token).user_id == "u1"
    with pytest.raises(AuthError, match="Signature verification failed"):
        verify_token(after, old_token)  # once the previous secret is dropped
    with pytest.raises(AuthError, match="Signature verification failed"):
        verify_token(before, new_token)
    assert during.jwt_verify_keys == (new, old)


def test_a_weak_previous_secret_is_refused_outside_dev() -> None:
    with pytest.raises(ConfigError, match="KEYPULSE_JWT_PREVIOUS_SECRET"):
        load(dev=False, jwt_secret=STRONG, jwt_previous_secret="changeme").jwt_verify_keys  # noqa: B018
    with pytest.raises(ConfigError, match="KEYPULSE_JWT_PREVIOUS_SECRET"):
        create_bridge(load(dev=False, jwt_secret=STRONG, jwt_previous_secret="short"),
                      kafka=False)
