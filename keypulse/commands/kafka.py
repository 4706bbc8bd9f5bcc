"""`keypulse kafka start|stop|status|acls`: the local single-node Kafka (DESIGN §6), and the
ACLs of keypulse's principals on any broker (docs/kafka-security.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import ConfigError
from core.settings import Settings
from infra.kafka import acls, launcher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "The local single-node Kafka, and the ACLs of keypulse's principals. "
        "Plain `kafka start` runs a PLAINTEXT broker at KEYPULSE_KAFKA_BOOTSTRAP. "
        "With --tls, KEYPULSE_KAFKA_BOOTSTRAP (host:port) is a TLS listener, the only one "
        "clients use; the controller listener stays on the controller port of the same host "
        "(KEYPULSE_KAFKA_CONTROLLER_PORT, default bootstrap port + 1), plaintext with --tls "
        "alone, SASL_SSL with --sasl. A self-signed CA and the broker's certificate are made "
        "in <data dir>/kafka/tls; start prints the CA file for clients' "
        "KEYPULSE_KAFKA_SSL_CA_FILE, with KEYPULSE_KAFKA_SECURITY_PROTOCOL=SSL (SASL_SSL)."
    )
    parser.add_argument(
        "action",
        choices=("start", "stop", "status", "acls"),
        help=(
            "start: fetch the jars with Maven (first time only), launch a broker+controller "
            "in the background at KEYPULSE_KAFKA_BOOTSTRAP and create the topics; "
            "stop: stop that broker (SIGTERM, SIGKILL after --timeout); "
            "status: pid, bootstrap, controller port, data dir and topic count; "
            "acls show|apply: the ACL table of keypulse's principals, or apply it to the "
            "broker at KEYPULSE_KAFKA_BOOTSTRAP as the admin in KEYPULSE_KAFKA_SASL_*"
        ),
    )
    parser.add_argument(
        "acl_action",
        nargs="?",
        choices=("show", "apply"),
        metavar="show|apply",
        help="acls only: show prints the table; apply ensures the topics, creates the ACLs "
        "and (with --password-dir) the principals' SCRAM-SHA-512 credentials; idempotent",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start: how long to wait for the broker to answer (default 60); "
        "stop: how long to wait for a clean exit before SIGKILL (default 30)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="start: the bootstrap address is a TLS listener (self-signed CA and certificate "
        "in <data dir>/kafka/tls, the CA file printed)",
    )
    parser.add_argument(
        "--sasl",
        action="store_true",
        help="start (implies --tls): SASL_SSL with SCRAM-SHA-512 and the ACL authorizer; the "
        "super user is KEYPULSE_KAFKA_SASL_USERNAME / KEYPULSE_KAFKA_SASL_PASSWORD, created "
        "when the storage is first formatted",
    )
    parser.add_argument(
        "--password-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="acls apply: set each principal's SCRAM-SHA-512 password from the file "
        "DIR/<name> (keypulse-api, keypulse-ws, keypulse-pipeline)",
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action != "acls" and (args.acl_action or args.password_dir):
        msg = "show|apply and --password-dir belong to `keypulse kafka acls`"
        raise ConfigError(msg)
    if args.action != "start" and (args.tls or args.sasl):
        msg = "--tls and --sasl belong to `keypulse kafka start`"
        raise ConfigError(msg)
    if args.action == "start":
        message = launcher.start(
            settings,
            wait_seconds=args.timeout or 60,
            progress=_progress,
            tls_listener=args.tls,
            sasl=args.sasl,
        )
    elif args.action == "stop":
        message = launcher.stop(settings, timeout=args.timeout or 30)
    elif args.action == "status":
        message = launcher.status(settings)
    elif args.acl_action == "apply":
        message = acls.apply(settings, password_dir=args.password_dir)
    elif args.acl_action == "show":
        if args.password_dir:
            msg = "--password-dir belongs to `keypulse kafka acls apply`"
            raise ConfigError(msg)
        message = acls.render_table(settings.topic_prefix)
    else:
        msg = "keypulse kafka acls needs show or apply"
        raise ConfigError(msg)
    print(message)
    return 0
