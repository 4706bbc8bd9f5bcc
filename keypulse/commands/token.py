"""`keypulse token --user U [--role R ...] [--ttl S]`: print a JWT (configured secret)."""

from __future__ import annotations

import argparse

from core.settings import Settings

# core.auth.ROLES, spelled out so that `--help` does not load PyJWT (a test keeps them equal).
ROLES = ("user", "admin", "ingest", "service", "analyst")

ROLES_HELP = (
    "a role to grant (repeatable): user = own data only; admin = administration; "
    "ingest = POST /v1/events for any user; service = API-key lifecycle events for any user; "
    "analyst = read-only SQL. Without --role the token acts as user"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="the user id (the token's sub)")
    parser.add_argument("--role", action="append", default=[], dest="roles", choices=ROLES,
                        help=ROLES_HELP)
    parser.add_argument("--ttl", type=float, default=3600.0,
                        help="seconds until the token expires (default 3600)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from core.auth import mint_token  # PyJWT and cryptography load only when used

    roles = tuple(dict.fromkeys(args.roles))  # each once, in the order given
    print(mint_token(settings, args.user, roles=roles, ttl_seconds=args.ttl))
    return 0
