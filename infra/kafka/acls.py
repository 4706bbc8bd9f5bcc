"""Who may do what on keypulse's topics: the one table of ACLs, shown and applied.

Each service authenticates as its own principal (SASL/SCRAM-SHA-512) and is allowed exactly
what its code does (the modules named in `ROLES`); with the broker's authorizer on and
`allow.everyone.if.no.acl.found=false`, everything else is refused. Topic names carry the
settings' `topic_prefix`; consumer group ids are the code's own, unprefixed.

`keypulse kafka acls show` prints `render_table`, the same text docs/kafka-security.md holds
(a unit test keeps them equal); `keypulse kafka acls apply` runs `apply` as the broker's super
user (KEYPULSE_KAFKA_SASL_*): topics ensured, ACLs created, and with a password directory each
principal's SCRAM-SHA-512 credential upserted from DIR/<name>. Every step is idempotent:
creating an ACL that exists changes nothing, an upsert replaces the credential.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

# re-exported by .admin, untyped there
from confluent_kafka.admin._acl import AclBinding, AclOperation, AclPermissionType
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType
from confluent_kafka.admin._scram import (
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)

from core import topics
from core.errors import ConfigError, ServiceError
from core.kafka import admin_config
from core.settings import Settings
from infra.kafka import launcher

logger = logging.getLogger(__name__)

SCRAM_ITERATIONS = 8192
# What SCRAM-SHA-512 passwords `--password-dir` accepts: no shorter than this.
MIN_PASSWORD_CHARS = 12


@dataclass(frozen=True)
class Role:
    """One principal's rights. `reads`/`writes`: unprefixed topic names (READ implies
    DESCRIBE); `groups`: consumer group ids, a trailing `*` meaning every id that starts
    with what precedes it."""

    principal: str
    why: str
    writes: tuple[str, ...]
    reads: tuple[str, ...]
    groups: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.principal.removeprefix("User:")


ROLES: tuple[Role, ...] = (
    Role(
        "User:keypulse-api",
        "the HTTP API: ingest, notifications, rules, API keys (api/); the system snapshot's "
        "log ends (core/system.py)",
        writes=(
            topics.USAGE_EVENTS,
            topics.NOTIFICATIONS,
            topics.ALERT_RULES,
            topics.APIKEY_EVENTS,
        ),
        reads=(topics.USAGE_EVENTS,),
        groups=("keypulse-system",),
    ),
    Role(
        "User:keypulse-ws",
        "the WebSocket bridge: fan-out and resume (ws_bridge/kafka_feed.py, resume.py), "
        "client events (client_events.py), monitoring (core/system.py)",
        writes=(topics.USAGE_EVENTS, topics.NOTIFICATIONS, topics.APIKEY_EVENTS),
        reads=(
            topics.USAGE_STATS,
            topics.USAGE_ALERTS,
            topics.NOTIFICATIONS,
            topics.APIKEY_EVENTS,
            topics.USAGE_EVENTS,
        ),
        groups=("keypulse-ws-*", "keypulse-system"),
    ),
    Role(
        "User:keypulse-pipeline",
        "the dataflow: its sources (pipeline/runner.py) and its output sink (pipeline/sinks.py)",
        writes=(
            topics.USAGE_STATS,
            topics.USAGE_ALERTS,
            topics.USAGE_EVENTS_DLQ,
            topics.NOTIFICATIONS,
        ),
        reads=(topics.USAGE_EVENTS, topics.NOTIFICATIONS, topics.APIKEY_EVENTS, topics.ALERT_RULES),
        groups=("keypulse-pipeline",),
    ),
)


@dataclass(frozen=True)
class Grant:
    """One ALLOW ACL: `principal` may `operation` the `resource` named `name`."""

    principal: str
    operation: str  # "READ" | "WRITE"
    resource: str  # "TOPIC" | "GROUP"
    name: str
    pattern: str  # "LITERAL" | "PREFIXED"

    def binding(self) -> AclBinding:
        return AclBinding(
            ResourceType[self.resource],
            self.name,
            ResourcePatternType[self.pattern],
            self.principal,
            "*",
            AclOperation[self.operation],
            AclPermissionType.ALLOW,
        )


def grants(prefix: str = "") -> list[Grant]:
    """Every ACL of `ROLES`, topic names with `prefix` (the settings' `topic_prefix`)."""
    out: list[Grant] = []
    for role in ROLES:
        out += [Grant(role.principal, "WRITE", "TOPIC", prefix + t, "LITERAL") for t in role.writes]
        out += [Grant(role.principal, "READ", "TOPIC", prefix + t, "LITERAL") for t in role.reads]
        for group in role.groups:
            pattern = "PREFIXED" if group.endswith("*") else "LITERAL"
            out.append(Grant(role.principal, "READ", "GROUP", group.rstrip("*"), pattern))
    return out


def render_table(prefix: str = "") -> str:
    """The ACL table as Markdown: one row per principal and operation."""
    lines = [
        "| principal | operation | resource | names |",
        "| --- | --- | --- | --- |",
    ]
    for role in ROLES:
        rows = (
            ("WRITE", "topic", [prefix + t for t in role.writes]),
            ("READ", "topic", [prefix + t for t in role.reads]),
            ("READ", "group", [g.replace("*", "…") for g in role.groups]),
        )
        for operation, resource, names in rows:
            shown = ", ".join(f"`{n}`" for n in names)
            lines.append(f"| `{role.principal}` | {operation} | {resource} | {shown} |")
    lines.append("")
    lines += [f"- `{role.principal}`: {role.why}" for role in ROLES]
    return "\n".join(lines)


def read_passwords(directory: Path) -> dict[str, str]:
    """Each principal's password from `directory/<name>` (one trailing newline dropped);
    ConfigError for a missing, unreadable or short one."""
    passwords: dict[str, str] = {}
    for role in ROLES:
        path = directory / role.name
        try:
            text = path.read_text()
        except OSError as exc:
            msg = f"cannot read the password of {role.principal} from {path}: {exc.strerror}"
            raise ConfigError(msg) from None
        password = text.removesuffix("\n").removesuffix("\r")
        if len(password) < MIN_PASSWORD_CHARS:
            msg = f"the password in {path} has fewer than {MIN_PASSWORD_CHARS} characters"
            raise ConfigError(msg)
        passwords[role.name] = password
    return passwords


def apply(settings: Settings, *, password_dir: Path | None = None, timeout: float = 30) -> str:
    """Ensure the topics, create every ACL of `grants`, and with `password_dir` upsert each
    principal's SCRAM-SHA-512 credential; run as the broker's super user. One line back."""
    passwords = read_passwords(password_dir) if password_dir is not None else None
    created = launcher.ensure_topics(settings, timeout=timeout)
    admin = AdminClient(admin_config(settings, logger=logging.getLogger(f"{__name__}.rdkafka")))
    wanted = grants(settings.topic_prefix)
    futures = admin.create_acls([grant.binding() for grant in wanted], request_timeout=timeout)
    for binding, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            msg = f"creating the ACL {binding} failed: {exc}"
            raise ServiceError(msg) from None
    note = f"{len(wanted)} ACLs for {len(ROLES)} principals at {settings.kafka_bootstrap}"
    if created:
        note += f"; created topics {', '.join(created)}"
    if passwords is not None:
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
        upserts: list[UserScramCredentialAlteration] = [
            UserScramCredentialUpsertion(user, info, password.encode())
            for user, password in passwords.items()
        ]
        for user, future in admin.alter_user_scram_credentials(
            upserts, request_timeout=timeout
        ).items():
            try:
                future.result(timeout=timeout)
            except KafkaException as exc:
                msg = f"setting the SCRAM-SHA-512 credential of {user} failed: {exc}"
                raise ServiceError(msg) from None
        note += f"; SCRAM-SHA-512 credentials set for {', '.join(passwords)}"
    logger.info("applied %s", note)
    return f"applied {note}"
