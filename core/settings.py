"""The one settings object (DESIGN §5). Nothing else in keypulse reads the environment."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from core.errors import ConfigError

PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "changethis", "secret", "dev", "test"}
)
DEV_JWT_SECRET = "keypulse-dev-only-secret-do-not-use-in-production"
# Settings that hold a secret: each may instead come from a file named by
# `KEYPULSE_<NAME>_FILE` (Docker and Kubernetes secrets), never both.
SECRET_SETTINGS = ("jwt_secret", "jwt_previous_secret", "kafka_sasl_password",
                   "clickhouse_dsn", "clickhouse_analyst_password")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Validated configuration, read once from `KEYPULSE_*` variables (and `.env`)."""

    model_config = SettingsConfigDict(
        env_prefix="KEYPULSE_", env_file=".env", extra="ignore", frozen=True
    )

    dev: bool = Field(False, description="development mode: allows the built-in JWT secret")
    data_dir: Path = Path(".keypulse")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = Field(0, ge=0, le=65535, description="0: bootstrap port + 1")
    kafka_heap_mb: int = Field(512, ge=128, le=512)
    # -- Kafka beyond localhost (issue 15): passed to every client by core.kafka --
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT")
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    # CA bundle (PEM) the brokers' certificates are checked against; None: the system's.
    kafka_ssl_ca_file: Path | None = None
    # Check that the broker's certificate names the host it was reached at.
    kafka_ssl_check_hostname: bool = True
    topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")
    topic_partitions: int = Field(4, ge=1, le=256)
    clickhouse_dsn: str = ""
    clickhouse_database: str = "keypulse"
    # -- the ClickHouse server path (issue 15) --
    # Migrations target this cluster (ON CLUSTER, Replicated* engines) when set.
    clickhouse_cluster: str = Field("", pattern=r"^[A-Za-z0-9_]*$")
    # `keypulse migrate` creates this read-only user for analysts (server only) when a
    # password is set.
    clickhouse_analyst_user: str = Field("keypulse_analyst", pattern=r"^[A-Za-z0-9_]+$")
    clickhouse_analyst_password: SecretStr = SecretStr("")
    notification_templates_file: Path | None = Field(
        None, description="a notification template registry replacing the packaged one")
    events_ttl_days: int = Field(30, ge=1, le=3650)
    # Retention of the 10 s stats and of the 1 m / 1 h / 1 d rollups (docs/analytics.md).
    stats_ttl_days: int = Field(30, ge=1, le=3650)
    rollup_1m_ttl_days: int = Field(90, ge=1, le=3650)
    rollup_1h_ttl_days: int = Field(400, ge=1, le=3650)
    rollup_1d_ttl_days: int = Field(1830, ge=1, le=36500)

    jwt_secret: SecretStr = SecretStr("")
    # During a rotation: the secret being retired, still accepted (never used to sign).
    jwt_previous_secret: SecretStr = SecretStr("")
    jwt_audience: str = "keypulse"
    jwt_issuer: str = "keypulse"
    jwt_algorithm: Literal["HS256"] = "HS256"
    jwt_leeway_seconds: int = Field(10, ge=0, le=300)
    jwt_max_ttl_seconds: int = Field(
        7 * 86_400, ge=60, le=366 * 86_400,
        description="tokens living longer than this (exp - iat, or exp - now) are refused")

    window_seconds: int = Field(10, ge=1, le=86_400)
    allowed_lateness_seconds: int = Field(5, ge=0, le=86_400)
    dedup_horizon_seconds: int = Field(3600, ge=0, le=7 * 86_400)
    dedup_max_ids: int = Field(2_000_000, ge=1000,
                               description="dedup ids kept in total, over every partition")
    # Event-time admission (DESIGN §1): an event more than this ahead of the time it is read
    # goes to the DLQ (`ts_in_future`), and no watermark passes wall time + this bound.
    max_clock_skew_seconds: int = Field(300, ge=0, le=86_400)
    # Distinct services one user may have open state for; beyond it: DLQ `too_many_services`.
    max_services_per_user: int = Field(100, ge=1, le=100_000)
    # Per-(user, service) alerting state idle this long (event time) is dropped.
    state_idle_seconds: int = Field(3600, ge=60, le=30 * 86_400)
    # Storage: attempts per failed ClickHouse batch before it is dead-lettered.
    insert_attempts: int = Field(3, ge=1, le=20)
    # A pipeline whose watermark lags wall time by more than this (while its input is caught
    # up) is reported stuck by /healthz.
    health_max_lag_seconds: int = Field(120, ge=10, le=86_400)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # `keypulse pipeline` serves /healthz, /readyz and /metrics on this port (process i of a
    # cluster: this + i), on `host`; 0: not served.
    pipeline_http_port: int = Field(9400, ge=0, le=65535)
    ws_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ws_max_connections_per_user: int = Field(20, ge=1)
    # Sockets upgraded but not yet authenticated, in total (beyond: refused at once).
    ws_max_pending: int = Field(1000, ge=1)
    # A resume replays at most this many frames / bytes; beyond: resync_required.
    ws_resume_max_frames: int = Field(5000, ge=1)
    ws_resume_max_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # HTTP server limits (uvicorn/h11): header bytes, header-read timeout.
    http_max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    http_header_timeout_seconds: float = Field(10.0, gt=0, le=300)
    # POST /v1/events: per-caller (token `sub`) token bucket in events/s, its burst (at least
    # one full batch), and how long Kafka has to confirm a batch before the answer is 503.
    ingest_rate_per_second: float = Field(50_000.0, gt=0)
    ingest_burst: int = Field(100_000, ge=1000)
    ingest_timeout_seconds: float = Field(5.0, gt=0, le=60)
    # /clickhouse/ and `keypulse sql` (read-only SQL): per-query time and result-size limits.
    sql_max_seconds: int = Field(30, ge=1, le=3600)
    sql_max_result_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    sql_max_result_rows: int = Field(10_000_000, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("ws_allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                msg = f"KEYPULSE_KAFKA_BOOTSTRAP: expected host:port[,host:port], got {value!r}"
                raise ValueError(msg)
        return value

    @field_validator("clickhouse_dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        if value and not value.startswith(("chdb://", "http://", "https://")):
            msg = f"KEYPULSE_CLICKHOUSE_DSN must start with chdb://, http:// or https://: {value!r}"
            raise ValueError(msg)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, dotenv_settings,
                SecretFiles(settings_cls, dotenv_settings), file_secret_settings)

    # -- derived values ---------------------------------------------------------------

    def jwt_problem(self) -> str | None:
        """Why the JWT secret cannot be used here, or None when it can."""
        secret = self.jwt_secret.get_secret_value()
        if self.dev:
            return None
        if secret.lower() in PLACEHOLDER_SECRETS or secret == DEV_JWT_SECRET:
            return (
                "KEYPULSE_JWT_SECRET is missing or a placeholder; set a random secret of at "
                "least 32 characters (or KEYPULSE_DEV=1 for local development)"
            )
        if len(secret) < 32:
            return "KEYPULSE_JWT_SECRET must be at least 32 characters"
        return None

    @property
    def jwt_key(self) -> str:
        """The HS256 key. ConfigError outside dev mode when the secret is missing or weak:
        every part that signs or verifies tokens refuses to start without a real one."""
        problem = self.jwt_problem()
        if problem is not None:
            raise ConfigError(problem)
        secret = self.jwt_secret.get_secret_value()
        return secret if secret else DEV_JWT_SECRET

    @property
    def jwt_verify_keys(self) -> tuple[str, ...]:
        """The keys a token may be signed with: the current one, then (during a rotation)
        the one being retired. Only `jwt_key` signs."""
        previous = self.jwt_previous_secret.get_secret_value()
        if not previous or previous == self.jwt_key:
            return (self.jwt_key,)
        if not self.dev and (previous.lower() in PLACEHOLDER_SECRETS or len(previous) < 32):
            msg = "KEYPULSE_JWT_PREVIOUS_SECRET must be a real secret of at least 32 characters"
            raise ConfigError(msg)
        return (self.jwt_key, previous)

    @property
    def dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb://")

    @property
    def bootstrap_host_port(self) -> tuple[str, int]:
        host, _, port = self.kafka_bootstrap.split(",")[0].strip().rpartition(":")
        return host, int(port)

    @property
    def controller_port(self) -> int:
        return self.kafka_controller_port or self.bootstrap_host_port[1] + 1

    def topic(self, name: str) -> str:
        """The physical topic name for a DESIGN §4 topic name."""
        return f"{self.topic_prefix}{name}"


class SecretFiles(PydanticBaseSettingsSource):
    """`KEYPULSE_<NAME>_FILE` for every name in SECRET_SETTINGS: the file's text, without its
    trailing newline. Setting both a secret and its file, or naming a file that cannot be read,
    is a ConfigError naming the variable (never the value)."""

    def __init__(self, settings_cls: type[BaseSettings],
                 dotenv: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._dotenv = dotenv

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # the values come from __call__

    def __call__(self) -> dict[str, Any]:
        environ = {key.upper(): value for key, value in self._environment().items()}
        values: dict[str, Any] = {}
        for name in SECRET_SETTINGS:
            variable = f"KEYPULSE_{name.upper()}"
            path = environ.get(f"{variable}_FILE")
            if not path:
                continue
            if environ.get(variable):
                msg = f"set {variable} or {variable}_FILE, not both"
                raise ConfigError(msg)
            try:
                values[name] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                msg = f"{variable}_FILE: cannot read {path}: {reason}"
                raise ConfigError(msg) from None
        return values

    def _environment(self) -> dict[str, str]:
        """The process environment over the .env file's values (as pydantic-settings ranks
        them)."""
        merged: dict[str, str] = {}
        env_vars = getattr(self._dotenv, "env_vars", None) or {}
        merged.update({k: v for k, v in env_vars.items() if isinstance(v, str)})
        merged.update(os.environ)
        return merged


def load(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides; ConfigError if invalid."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(problems) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load()
