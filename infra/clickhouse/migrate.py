"""Apply the SQL migrations in `migrations/` once each, recorded in `{db}.schema_migrations`.

Versioned files `NNNN_name.sql` run once, in order; an applied file whose text changed is
refused (write a new migration instead). Repeatable files `R__name.sql` run again whenever
their rendered text changes (settings such as the events TTL), and after any versioned
migration of the same run, which may have rebuilt a table they alter. DDL lives only here.

With `KEYPULSE_CLICKHOUSE_CLUSTER` set, each statement is rendered for that cluster as it is
sent (`on_cluster`): `ON CLUSTER <name>` on every DDL statement and Replicated* engines with
the path `REPLICA_PATH`. The files stay single-server SQL, and the bookkeeping records the
checksum of that text, so the rendering never counts as a change. With no cluster the rendering
is the identity: chDB runs the files' text as before. docs/clickhouse.md says why each rule.

`ensure_analyst` (run by `keypulse migrate`) creates or updates the read-only analyst user on
a server; never on the embedded engine.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.httpclient import HttpClient

from core.errors import ConfigError, ServiceError
from core.settings import Settings

logger = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_VERSIONED = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_REPEATABLE = re.compile(r"^R__([a-z0-9_]+)\.sql$")
_REQUIRES = re.compile(r"^-- requires: (\d{4})$", re.MULTILINE)

# -- rendering for a cluster ---------------------------------------------------------------
# `{uuid}` is the table's own UUID, which the initiator of an ON CLUSTER CREATE chooses once for
# every replica: a table built anew under an old name (0006 and 0009 build a copy, EXCHANGE the
# names and drop the old table; an interrupted run drops and creates the copy again) gets a
# Keeper path of its own, where a path made of its name would meet the dropped table's, which
# an Atomic database keeps for minutes. `{shard}` and `{replica}` are the server's macros.
REPLICA_PATH = "/clickhouse/tables/{uuid}/{shard}"
REPLICA_NAME = "{replica}"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?"
_LEAD = r"(?:\s*--[^\n]*\n)*\s*"  # comments a statement may start with (see statements())
# The DDL the migrations use, each with the place ON CLUSTER goes (after the group `head`).
_DDL = [
    re.compile(rf"^(?P<head>{_LEAD}CREATE\s+(?:TABLE|DATABASE|(?:MATERIALIZED\s+)?VIEW)\s+"
               rf"(?:IF\s+NOT\s+EXISTS\s+)?{_NAME})", re.IGNORECASE),
    re.compile(rf"^(?P<head>{_LEAD}ALTER\s+TABLE\s+{_NAME})", re.IGNORECASE),
    re.compile(rf"^(?P<head>{_LEAD}DROP\s+(?:TABLE|VIEW|DATABASE)\s+(?:IF\s+EXISTS\s+)?{_NAME})",
               re.IGNORECASE),
    re.compile(rf"^(?P<head>{_LEAD}EXCHANGE\s+TABLES\s+{_NAME}\s+AND\s+{_NAME})", re.IGNORECASE),
]
# Statements that are not DDL run on the node the client is connected to (an INSERT ... SELECT
# into a replicated table reaches the other replicas through replication).
_NOT_DDL = re.compile(rf"^{_LEAD}(?:INSERT|SELECT|WITH)\b", re.IGNORECASE)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(?P<engine>[A-Za-z]*MergeTree)\b(?:\s*\((?P<args>[^()]*)\))?")


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


def on_cluster(statement: str, cluster: str) -> str:
    """`statement` rendered for `cluster` (itself when `cluster` is empty): `ON CLUSTER` after
    the name(s) of a CREATE/ALTER/DROP/EXCHANGE and `ENGINE = XMergeTree(args)` as
    `ReplicatedXMergeTree(REPLICA_PATH, REPLICA_NAME, args)`. ConfigError for a statement of a
    kind it does not know, so a new migration cannot reach a cluster half-rendered."""
    if not cluster:
        return statement
    if not _IDENT.match(cluster):
        msg = f"KEYPULSE_CLICKHOUSE_CLUSTER: not a valid identifier: {cluster!r}"
        raise ConfigError(msg)
    if _NOT_DDL.match(statement):
        return statement
    for pattern in _DDL:
        if found := pattern.match(statement):
            head = found.group("head")
            rendered = f"{head} ON CLUSTER {cluster}{statement[len(head):]}"
            return _ENGINE.sub(_replicated, rendered)
    msg = f"cannot render for a cluster: {statement.strip()[:120]!r}"
    raise ConfigError(msg)


def _replicated(found: re.Match[str]) -> str:
    engine, args = found.group("engine"), (found.group("args") or "").strip()
    if engine.startswith("Replicated"):
        return found.group(0)
    params = ", ".join(part for part in (f"'{REPLICA_PATH}'", f"'{REPLICA_NAME}'", args) if part)
    return f"ENGINE = Replicated{engine}({params})"


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
    cluster = settings.clickhouse_cluster
    migrations = [m for m in load_migrations(settings)
                  if target is None or (m.requires if m.repeatable else m.version) <= target]
    # rendered before anything runs: a statement that cannot be rendered stops nothing halfway
    rendered = {m.version: [on_cluster(s, cluster) for s in m.statements()] for m in migrations}
    prepare = [on_cluster(s, cluster) for s in bookkeeping(db)]
    try:
        for statement in prepare:
            client.command(statement)
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
        for statement in rendered[migration.version]:
            try:
                client.command(statement)
            except Exception as exc:
                msg = f"migration {migration.version} failed: {_engine_error(exc)}"
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


def bookkeeping(db: str) -> list[str]:
    """The statements that create the database and its `schema_migrations` table (single
    server text; `migrate` renders them with `on_cluster` like the migrations)."""
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version String, name String, "
        "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree(applied_at) ORDER BY version",
    ]


# -- the analyst user ---------------------------------------------------------------------------


def analyst_statements(settings: Settings, salt: str | None = None) -> list[str]:
    """CREATE USER IF NOT EXISTS, then ALTER USER (so a rerun applies a rotated password and
    changed limits), then GRANT SELECT on the keypulse database only. The password travels as
    its salted SHA-256 (`sha256_hash ... SALT`): it never reaches the server's query log. The
    user's settings are the `/clickhouse/` limits and `readonly = 1`, which also refuses any
    change of them and the table functions (file(), url(), remote(), s3() ...)."""
    user = settings.clickhouse_analyst_user
    password = settings.clickhouse_analyst_password.get_secret_value()
    if not password:
        msg = "KEYPULSE_CLICKHOUSE_ANALYST_PASSWORD is empty: no analyst user to create"
        raise ConfigError(msg)
    salt = secrets.token_hex(16) if salt is None else salt
    if not re.fullmatch(r"[0-9a-f]{1,64}", salt):
        msg = f"a salt is hex: {salt!r}"
        raise ConfigError(msg)
    digest = hashlib.sha256((password + salt).encode()).hexdigest()
    db = settings.clickhouse_database
    where = f" ON CLUSTER {settings.clickhouse_cluster}" if settings.clickhouse_cluster else ""
    who = (f"IDENTIFIED WITH sha256_hash BY '{digest}' SALT '{salt}' DEFAULT DATABASE {db} "
           f"SETTINGS max_execution_time = {int(settings.sql_max_seconds)}, "
           f"max_result_rows = {int(settings.sql_max_result_rows)}, "
           f"max_result_bytes = {int(settings.sql_max_result_bytes)}, "
           "result_overflow_mode = 'throw', readonly = 1")
    return [
        f"CREATE USER IF NOT EXISTS {user}{where} {who}",
        f"ALTER USER {user}{where} {who}",
        f"GRANT{where} SELECT ON {db}.* TO {user}",
    ]


def ensure_analyst(client: Client, settings: Settings,
                   progress: Callable[[str], None] = logger.info) -> bool:
    """Create or update the analyst user when `KEYPULSE_CLICKHOUSE_ANALYST_PASSWORD` is set and
    `client` is a server's; True when it did. The embedded engine has no users: skipped, logged."""
    if not settings.clickhouse_analyst_password.get_secret_value():
        return False
    user = settings.clickhouse_analyst_user
    if not isinstance(client, HttpClient):
        progress(f"analyst user {user} skipped: the embedded engine has no users "
                 "(it needs a ClickHouse server)")
        return False
    progress(f"analyst user {user}: read-only on {settings.clickhouse_database}")
    for statement in analyst_statements(settings):
        try:
            client.command(statement)
        except Exception as exc:
            # the statement holds the password's hash: report the engine's first line only
            msg = f"cannot create the analyst user {user}: {_engine_error(exc)}"
            raise ServiceError(msg) from None
    return True


def _engine_error(exc: BaseException) -> str:
    """The first line of an engine's error (its message can quote the whole statement)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else repr(exc)
