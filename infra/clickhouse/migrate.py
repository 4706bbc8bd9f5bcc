"""Apply the SQL migrations in `migrations/` once each, recorded in `{db}.schema_migrations`.

Versioned files `NNNN_name.sql` run once, in order; an applied file whose text changed is
refused (write a new migration instead). Repeatable files `R__name.sql` run again whenever
their rendered text changes (settings such as the events TTL), and after any versioned
migration of the same run, which may have rebuilt a table they alter. DDL lives only here.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from clickhouse_connect.driver.client import Client

from core.errors import ConfigError, ServiceError
from core.settings import Settings

logger = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_VERSIONED = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_REPEATABLE = re.compile(r"^R__([a-z0-9_]+)\.sql$")
_REQUIRES = re.compile(r"^-- requires: (\d{4})$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: str  # "0001" or "R__events_ttl"
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def repeatable(self) -> bool:
        return self.version.startswith("R__")

    @property
    def requires(self) -> str:
        """The versioned migration a repeatable one needs (its `-- requires: NNNN` line;
        "0000" when it has none): a schema held at an older `target` skips it."""
        found = _REQUIRES.search(self.sql)
        return found.group(1) if found else "0000"

    def statements(self) -> list[str]:
        lines = [ln for ln in self.sql.splitlines() if not ln.lstrip().startswith("--")]
        return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


def load_migrations(settings: Settings) -> list[Migration]:
    db = settings.clickhouse_database
    if not _IDENT.match(db):
        msg = f"KEYPULSE_CLICKHOUSE_DATABASE: not a valid identifier: {db!r}"
        raise ConfigError(msg)
    params = {"db": db}
    for name in ("events_ttl_days", "stats_ttl_days", "rollup_1m_ttl_days",
                 "rollup_1h_ttl_days", "rollup_1d_ttl_days"):
        params[name] = str(int(getattr(settings, name)))
    folder = resources.files("infra.clickhouse") / "migrations"
    versioned: list[Migration] = []
    repeatable: list[Migration] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        text = entry.read_text(encoding="utf-8")
        for key, value in params.items():
            text = text.replace("{" + key + "}", value)
        if m := _VERSIONED.match(entry.name):
            versioned.append(Migration(m.group(1), m.group(2), text))
        elif m := _REPEATABLE.match(entry.name):
            repeatable.append(Migration(f"R__{m.group(1)}", m.group(1), text))
    return versioned + repeatable


def migrate(
    client: Client,
    settings: Settings,
    progress: Callable[[str], None] = logger.info,
    *,
    target: str | None = None,
) -> list[str]:
    """Apply what is pending; return the versions applied (empty when up to date).
    `target` ("0005") stops the versioned migrations after that version, as a schema of an
    older release had them (the repeatable ones still run, but those that declare `-- requires:`
a later version)."""
    db = settings.clickhouse_database
    migrations = [m for m in load_migrations(settings)
                  if target is None or (m.requires if m.repeatable else m.version) <= target]
    try:
        client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        client.command(
            f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version String, name String, "
            "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = ReplacingMergeTree(applied_at) ORDER BY version"
        )
        rows = client.query(
            f"SELECT version, argMax(checksum, applied_at) FROM {db}.schema_migrations "
            "GROUP BY version"
        ).result_rows
    except Exception as exc:
        msg = f"cannot prepare the migrations table: {str(exc).splitlines()[0][:300]}"
        raise ServiceError(msg) from None
    applied = {str(version): str(checksum) for version, checksum in rows}
    done: list[str] = []
    for migration in migrations:
        previous = applied.get(migration.version)
        rebuilt = any(not version.startswith("R__") for version in done)
        if previous == migration.checksum and not (migration.repeatable and rebuilt):
            continue
        if previous is not None and not migration.repeatable:
            msg = (
                f"migration {migration.version}_{migration.name} changed after it was applied; "
                "add a new migration instead of editing an applied one"
            )
            raise ConfigError(msg)
        progress(f"applying {migration.version} {migration.name}")
        for statement in migration.statements():
            try:
                client.command(statement)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
                msg = f"migration {migration.version} failed: {first}"
                raise ServiceError(msg) from None
        # A parameterised INSERT, not client.insert(): that one imports pandas (0.3 s of a
        # cold start) to check whether the rows are a DataFrame.
        client.command(
            f"INSERT INTO {db}.schema_migrations (version, name, checksum) "
            "VALUES ({version:String}, {name:String}, {checksum:String})",
            parameters={"version": migration.version, "name": migration.name,
                        "checksum": migration.checksum},
        )
        done.append(migration.version)
    return done
