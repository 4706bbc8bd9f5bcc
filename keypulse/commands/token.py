"""`keypulse token --user U [--role admin] [--ttl S]`: print a JWT (configured secret)."""

from __future__ import annotations

import argparse

from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="the user id (the token's sub)")
    parser.add_argument("--role", action="append", default=[], dest="roles",
                        help="a role to grant, e.g. admin (repeatable)")
    parser.add_argument("--ttl", type=float, default=3600.0,
                        help="seconds until the token expires (default 3600)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from core.auth import mint_token  # PyJWT and cryptography load only when used

    print(mint_token(settings, args.user, roles=tuple(args.roles), ttl_seconds=args.ttl))
    return 0
