"""The ClickHouse server path without a server: the cluster rendering of the migrations, the
analyst user's statements and the server client's options, in memory (docs/clickhouse.md).

The engine parses the same statements in tests/integration/test_clickhouse_server_sql.py;
tests/integration/test_clickhouse_server.py runs them on a real server when one is named.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import pytest
from pydantic import SecretStr

from core.clickhouse import SERVER_SETTINGS, connect, server_dsn, server_settings
from core.errors import ConfigError, ServiceError
from core.settings import Settings, load
from infra.clickhouse.migrate import (
    REPLICA_NAME,
    REPLICA_PATH,
    analyst_statements,
    bookkeeping,
    load_migrations,
    on_cluster,
)

CLUSTER = "kp_cluster"
REPLICA_ARGS = f"'{REPLICA_PATH}', '{REPLICA_NAME}'"
ENGINE = re.compile(r"\bENGINE\s*=\s*(\w+)")


def _settings(**changes: object) -> Settings:
    return load(dev=True).model_copy(update=changes)


def _statements(settings: Settings) -> list[str]:
    db = settings.clickhouse_database
    return bookkeeping(db) + [s for m in load_migrations(settings) for s in m.statements()]


def test_without_a_cluster_the_migrations_are_the_files_text() -> None:
    """What chDB (and a single server) runs is the files' text, parameters filled in, and the
    bookkeeping table is the one every existing database already has."""
    settings = _settings()
    folder = resources.files("infra.clickhouse") / "migrations"
    migrations = load_migrations(settings)
    assert len(migrations) >= 12
    for migration in migrations:
        name = (
            f"{migration.version}.sql"
            if migration.repeatable
            else f"{migration.version}_{migration.name}.sql"
        )
        text = (folder / name).read_text(encoding="utf-8")
        for key in (
            "db",
            "events_ttl_days",
            "stats_ttl_days",
            "rollup_1m_ttl_days",
            "rollup_1h_ttl_days",
            "rollup_1d_ttl_days",
        ):
            value = settings.clickhouse_database if key == "db" else str(getattr(settings, key))
            text = text.replace("{" + key + "}", value)
        assert migration.sql == text, name
        assert migration.checksum == hashlib.sha256(text.encode()).hexdigest()
    statements = _statements(settings)
    assert len(statements) > 50
    assert [on_cluster(s, "") for s in statements] == statements
    assert bookkeeping("keypulse") == [
        "CREATE DATABASE IF NOT EXISTS keypulse",
        "CREATE TABLE IF NOT EXISTS keypulse.schema_migrations (version String, name String, "
        "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree(applied_at) ORDER BY version",
    ]


def test_the_checksums_do_not_depend_on_the_cluster() -> None:
    """A migration's identity is its text: rendering for a cluster is not an edit."""
    plain = {m.version: m.checksum for m in load_migrations(_settings())}
    clustered = {
        m.version: m.checksum for m in load_migrations(_settings(clickhouse_cluster=CLUSTER))
    }
    assert plain == clustered


@pytest.mark.parametrize(
    ("statement", "rendered"),
    [
        (
            "CREATE DATABASE IF NOT EXISTS kp",
            f"CREATE DATABASE IF NOT EXISTS kp ON CLUSTER {CLUSTER}",
        ),
        (
            "CREATE TABLE IF NOT EXISTS kp.t\n(\n    a String\n)\nENGINE = ReplacingMergeTree(at)\n"
            "ORDER BY a",
            f"CREATE TABLE IF NOT EXISTS kp.t ON CLUSTER {CLUSTER}\n(\n    a String\n)\n"
            f"ENGINE = ReplicatedReplacingMergeTree({REPLICA_ARGS}, at)\nORDER BY a",
        ),
        (
            "CREATE TABLE kp.r (v UInt64, d UInt8) ENGINE = ReplacingMergeTree(v, d) ORDER BY v",
            f"CREATE TABLE kp.r ON CLUSTER {CLUSTER} (v UInt64, d UInt8) "
            f"ENGINE = ReplicatedReplacingMergeTree({REPLICA_ARGS}, v, d) ORDER BY v",
        ),
        (
            "CREATE TABLE kp.m (a String) ENGINE = MergeTree ORDER BY a",
            f"CREATE TABLE kp.m ON CLUSTER {CLUSTER} (a String) "
            f"ENGINE = ReplicatedMergeTree({REPLICA_ARGS}) ORDER BY a",
        ),
        (
            "CREATE TABLE kp.m (a String) ENGINE = MergeTree() ORDER BY a",
            f"CREATE TABLE kp.m ON CLUSTER {CLUSTER} (a String) "
            f"ENGINE = ReplicatedMergeTree({REPLICA_ARGS}) ORDER BY a",
        ),
        (
            "CREATE TABLE kp.x AS kp.t\nENGINE = ReplacingMergeTree(at)\nORDER BY a",
            f"CREATE TABLE kp.x ON CLUSTER {CLUSTER} AS kp.t\n"
            f"ENGINE = ReplicatedReplacingMergeTree({REPLICA_ARGS}, at)\nORDER BY a",
        ),
        (
            "CREATE TABLE IF NOT EXISTS kp.n (a String) ENGINE = Null",
            f"CREATE TABLE IF NOT EXISTS kp.n ON CLUSTER {CLUSTER} (a String) ENGINE = Null",
        ),
        (
            "CREATE MATERIALIZED VIEW IF NOT EXISTS kp.v TO kp.t AS SELECT a FROM kp.n",
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS kp.v ON CLUSTER {CLUSTER} TO kp.t AS "
            "SELECT a FROM kp.n",
        ),
        (
            "ALTER TABLE kp.t MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY",
            f"ALTER TABLE kp.t ON CLUSTER {CLUSTER} MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY",
        ),
        (
            "ALTER TABLE kp.t\n    ADD COLUMN IF NOT EXISTS k String DEFAULT 'x'",
            f"ALTER TABLE kp.t ON CLUSTER {CLUSTER}\n"
            "    ADD COLUMN IF NOT EXISTS k String DEFAULT 'x'",
        ),
        ("DROP VIEW IF EXISTS kp.v", f"DROP VIEW IF EXISTS kp.v ON CLUSTER {CLUSTER}"),
        ("DROP TABLE kp.t", f"DROP TABLE kp.t ON CLUSTER {CLUSTER}"),
        ("EXCHANGE TABLES kp.a AND kp.b", f"EXCHANGE TABLES kp.a AND kp.b ON CLUSTER {CLUSTER}"),
        # a comment left of a statement by the previous one's `;`
        (
            "-- R__events_ttl applies it\n\nCREATE TABLE kp.t (a String) "
            "ENGINE = ReplacingMergeTree ORDER BY a",
            f"-- R__events_ttl applies it\n\nCREATE TABLE kp.t ON CLUSTER {CLUSTER} (a String) "
            f"ENGINE = ReplicatedReplacingMergeTree({REPLICA_ARGS}) ORDER BY a",
        ),
        # not DDL: runs where the client is, replication carries the rows
        (
            "INSERT INTO kp.b SELECT * FROM kp.a SETTINGS max_partitions_per_insert_block = 0",
            "INSERT INTO kp.b SELECT * FROM kp.a SETTINGS max_partitions_per_insert_block = 0",
        ),
        # already replicated: left alone
        (
            "CREATE TABLE kp.r (a String) ENGINE = ReplicatedMergeTree('/p', 'r') ORDER BY a",
            f"CREATE TABLE kp.r ON CLUSTER {CLUSTER} (a String) "
            "ENGINE = ReplicatedMergeTree('/p', 'r') ORDER BY a",
        ),
    ],
)
def test_each_kind_of_statement_renders_for_a_cluster(statement: str, rendered: str) -> None:
    assert on_cluster(statement, CLUSTER) == rendered
    assert on_cluster(statement, "") == statement


@pytest.mark.parametrize(
    "statement",
    [
        "OPTIMIZE TABLE kp.t FINAL",
        "TRUNCATE TABLE kp.t",
        "RENAME TABLE kp.a TO kp.b",
        "CREATE FUNCTION f AS x -> x",
        "SYSTEM SYNC REPLICA kp.t",
    ],
)
def test_a_statement_it_cannot_render_is_refused(statement: str) -> None:
    with pytest.raises(ConfigError, match="cannot render for a cluster"):
        on_cluster(statement, CLUSTER)
    assert on_cluster(statement, "") == statement  # the single-server text is never refused


def test_a_cluster_name_must_be_an_identifier() -> None:
    with pytest.raises(ConfigError, match="KEYPULSE_CLICKHOUSE_CLUSTER"):
        on_cluster("DROP TABLE kp.t", "a b")


def test_every_migration_renders_for_a_cluster_with_each_engine_replicated() -> None:
    statements = _statements(_settings())
    ddl = [s for s in statements if not re.match(r"(?:\s*--[^\n]*\n)*\s*INSERT\b", s)]
    rendered = [on_cluster(s, CLUSTER) for s in statements]
    assert sum(f" ON CLUSTER {CLUSTER}" in r for r in rendered) == len(ddl) > 50
    engines = [e for s in statements for e in ENGINE.findall(s)]
    replicated = [e for r in rendered for e in ENGINE.findall(r)]
    assert len(engines) == len(replicated) > 15
    for before, after in zip(engines, replicated, strict=True):
        assert after == (f"Replicated{before}" if before.endswith("MergeTree") else before)
    assert set(engines) == {"ReplacingMergeTree", "Null"}
    assert sum(REPLICA_ARGS in r for r in rendered) == engines.count("ReplacingMergeTree")


def test_analyst_statements_carry_a_salted_hash_the_limits_and_select_only() -> None:
    settings = _settings(
        clickhouse_analyst_password=SecretStr("s3cret-pass"),
        clickhouse_analyst_user="analyst_x",
        sql_max_seconds=12,
        sql_max_result_rows=345,
        sql_max_result_bytes=67890,
    )
    create, alter, grant = analyst_statements(settings, salt="00ff")
    digest = hashlib.sha256(b"s3cret-pass00ff").hexdigest()
    identified = f"IDENTIFIED WITH sha256_hash BY '{digest}' SALT '00ff'"
    assert create.startswith(f"CREATE USER IF NOT EXISTS analyst_x {identified} ")
    assert alter.startswith(f"ALTER USER analyst_x {identified} ")
    for statement in (create, alter):
        assert "DEFAULT DATABASE keypulse" in statement
        assert statement.endswith(
            "SETTINGS max_execution_time = 12, max_result_rows = 345, "
            "max_result_bytes = 67890, result_overflow_mode = 'throw', readonly = 1"
        )
    assert grant == "GRANT SELECT ON keypulse.* TO analyst_x"
    assert all("s3cret" not in s for s in (create, alter, grant))
    # a new salt each run: the stored hash changes, the password it checks does not
    assert analyst_statements(settings)[0] != analyst_statements(settings)[0]


def test_analyst_statements_on_a_cluster() -> None:
    settings = _settings(clickhouse_analyst_password=SecretStr("p"), clickhouse_cluster=CLUSTER)
    create, alter, grant = analyst_statements(settings, salt="ab")
    assert create.startswith(
        f"CREATE USER IF NOT EXISTS keypulse_analyst ON CLUSTER {CLUSTER} "
        "IDENTIFIED WITH sha256_hash"
    )
    assert alter.startswith(f"ALTER USER keypulse_analyst ON CLUSTER {CLUSTER} IDENTIFIED")
    assert grant == f"GRANT ON CLUSTER {CLUSTER} SELECT ON keypulse.* TO keypulse_analyst"


def test_analyst_statements_need_a_password_and_a_hex_salt() -> None:
    with pytest.raises(ConfigError, match="ANALYST_PASSWORD"):
        analyst_statements(_settings())
    with pytest.raises(ConfigError, match="salt"):
        analyst_statements(_settings(clickhouse_analyst_password=SecretStr("p")), salt="x'y")


def test_server_dsn_drops_the_database_path_only() -> None:
    assert server_dsn("http://u:p@h:8123/keypulse") == "http://u:p@h:8123"
    assert (
        server_dsn("https://u:p%40x@h:8443/db?compress=zstd")
        == "https://u:p%40x@h:8443?compress=zstd"
    )
    assert server_dsn("http://h:8123") == "http://h:8123"


def test_server_settings_are_only_those_the_server_knows() -> None:
    assert server_settings(set(SERVER_SETTINGS)) == SERVER_SETTINGS
    older = server_settings({"async_insert", "insert_deduplicate", "max_threads"})
    assert older == {"async_insert": 0, "insert_deduplicate": 1}
    assert server_settings(set()) == {}


def test_an_unreachable_server_is_one_line_with_the_password_hidden() -> None:
    """The server options (LZ4 among them) are accepted by the client: what fails is the
    connection, reported without the password."""
    with pytest.raises(ServiceError) as caught:
        connect("http://kp:hunter2@127.0.0.1:1/keypulse")
    assert str(caught.value) == (
        "cannot reach ClickHouse at http://kp:***@127.0.0.1:1/keypulse: Connection refused"
    )
