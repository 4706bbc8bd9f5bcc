"""JWT mint and verify, shared by the WebSocket bridge and the HTTP API (DESIGN §5, §7).

Verification is deliberately strict: the algorithm list comes from settings (never from the
token header), `exp`, `sub`, `aud` and `iss` are required, `aud` and `iss` must equal the
configured values exactly, `nbf` is honoured, and the only tolerance is
`settings.jwt_leeway_seconds`. Time comes from an injectable clock.

A correctly signed token is still input: its claims are checked for shape before use (`sub` a
printable string of 1..128 characters, `roles` at most 32 printable strings, time claims
numbers within the years 0..9999, `iat` not in the future), and a token may live at most
`settings.jwt_max_ttl_seconds` (`exp - iat`, or `exp - now` without `iat`). Every refusal is
an AuthError, never another exception.

    AuthError(KeypulseError)   the token is missing, malformed, forged, expired or not for us
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

from core.clock import Clock, system_clock
from core.errors import KeypulseError
from core.settings import Settings

MAX_TOKEN_CHARS = 8192
MAX_USER_ID_CHARS = 128
MAX_ROLES = 32
MAX_ROLE_CHARS = 64
MAX_EPOCH_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z: any later time claim is refused
# Roles (DESIGN §8). A token without roles acts as USER_ROLE (the WebSocket's tokens have none).
USER_ROLE = "user"  # own data only: the user filter comes from `sub`
ADMIN_ROLE = "admin"
INGEST_ROLE = "ingest"  # posts usage events for any user
SERVICE_ROLE = "service"  # the key-management backend: API-key lifecycle events for any user
ANALYST_ROLE = "analyst"  # read-only SQL
ROLES = (USER_ROLE, ADMIN_ROLE, INGEST_ROLE, SERVICE_ROLE, ANALYST_ROLE)


class AuthError(KeypulseError):
    """The token does not authenticate anyone; `str(exc)` is safe to show the client."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    user_id: str
    roles: tuple[str, ...]
    expires_at: float  # epoch seconds (the token's exp)

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


def mint_token(
    settings: Settings,
    user_id: str,
    *,
    roles: tuple[str, ...] | list[str] = (),
    ttl_seconds: float = 3600,
    clock: Clock = system_clock,
) -> str:
    """A signed token for `user_id` with the configured secret, algorithm, issuer, audience;
    AuthError for what `verify_token` would refuse (a bad id or role, a ttl beyond the max)."""
    if not valid_user_id(user_id):
        msg = "user id must be 1..128 printable characters, not '*'"
        raise AuthError(msg)
    if not _valid_roles(list(roles)):
        msg = f"at most {MAX_ROLES} roles of 1..{MAX_ROLE_CHARS} printable characters"
        raise AuthError(msg)
    if not 0 < ttl_seconds <= settings.jwt_max_ttl_seconds:
        msg = f"ttl must be positive and at most {settings.jwt_max_ttl_seconds} s"
        raise AuthError(msg)
    now = int(clock())
    claims = {
        "sub": user_id,
        "roles": list(roles),
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now,
        "nbf": now,
        "exp": now + math.ceil(ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, settings.jwt_key, algorithm=settings.jwt_algorithm)


def verify_token(settings: Settings, token: str, *, clock: Clock = system_clock) -> Principal:
    """The principal of a valid token, else AuthError."""
    if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():  # JWTs are base64url
        msg = "invalid token"
        raise AuthError(msg)
    claims = _decode(settings, token)
    # Exact matches, whatever the library version does with lists or substrings.
    if claims.get("iss") != settings.jwt_issuer:
        msg = "invalid token: wrong issuer"
        raise AuthError(msg)
    aud = claims.get("aud")
    listed = isinstance(aud, list) and settings.jwt_audience in aud
    if aud != settings.jwt_audience and not listed:
        msg = "invalid token: wrong audience"
        raise AuthError(msg)
    sub = claims.get("sub")
    if not valid_user_id(sub):
        msg = "invalid token: bad subject"
        raise AuthError(msg)
    roles = claims.get("roles", [])
    if not _valid_roles(roles):
        msg = (f"invalid token: roles must be a list of at most {MAX_ROLES} strings of "
               f"1..{MAX_ROLE_CHARS} printable characters")
        raise AuthError(msg)
    now = clock()
    leeway = settings.jwt_leeway_seconds
    exp = _time_claim(claims, "exp")
    if exp is None or now > exp + leeway:
        msg = "invalid token: expired"
        raise AuthError(msg)
    nbf = _time_claim(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        msg = "invalid token: not yet valid"
        raise AuthError(msg)
    iat = _time_claim(claims, "iat")
    if iat is not None and iat > now + leeway:
        msg = "invalid token: issued in the future"
        raise AuthError(msg)
    if exp - (now if iat is None else iat) > settings.jwt_max_ttl_seconds:
        msg = f"invalid token: lives longer than {settings.jwt_max_ttl_seconds} s"
        raise AuthError(msg)
    return Principal(user_id=sub, roles=tuple(roles), expires_at=exp)


def _decode(settings: Settings, token: str) -> dict[str, Any]:
    """The claims of a token signed with the current key or, during a rotation, the previous
    one; AuthError otherwise."""
    current, *previous = settings.jwt_verify_keys
    try:
        try:
            return _claims(settings, token, current)
        except jwt.InvalidSignatureError:
            if not previous:
                raise
            return _claims(settings, token, previous[0])  # signed before the rotation, perhaps
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:  # odd JSON inside
        msg = f"invalid token: {str(exc)[:200]}"
        raise AuthError(msg) from None


def _claims(settings: Settings, token: str, key: str) -> dict[str, Any]:
    return jwt.decode(
        token,
        key,
        algorithms=[settings.jwt_algorithm],
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        options={
            "require": ["exp", "sub", "aud", "iss"],
            # time claims are checked by the caller against the injectable clock
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        },
    )


def valid_user_id(value: object) -> TypeGuard[str]:
    """A user id (a token's `sub`, a Kafka key): 1..128 printable characters (so no control
    characters or lone surrogates: it always encodes to UTF-8), and not the broadcast `*`."""
    return (isinstance(value, str) and 1 <= len(value) <= MAX_USER_ID_CHARS
            and value != "*" and value.isprintable())


def _valid_roles(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_ROLES and all(
        isinstance(r, str) and 1 <= len(r) <= MAX_ROLE_CHARS and r.isprintable() for r in value)


def _time_claim(claims: dict[str, object], name: str) -> float | None:
    """A time claim in epoch seconds; AuthError unless a finite number in years 0..9999
    (compared before any float conversion: `exp` = 10**400 is an int no float holds)."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"invalid token: {name} must be a number"
        raise AuthError(msg)
    if not (math.isfinite(value) if isinstance(value, float) else True) or not (
            0 <= value <= MAX_EPOCH_SECONDS):
        msg = f"invalid token: {name} out of range"
        raise AuthError(msg)
    return float(value)
