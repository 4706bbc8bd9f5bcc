"""JWT mint and verify, shared by the WebSocket bridge and the HTTP API (DESIGN §5, §7).

Verification is deliberately strict: the algorithm list comes from settings (never from the
token header), `exp`, `sub`, `aud` and `iss` are required, `aud` and `iss` must equal the
configured values exactly, `nbf` is honoured, and the only tolerance is
`settings.jwt_leeway_seconds`. Time comes from an injectable clock.

    AuthError(KeypulseError)   the token is missing, malformed, forged, expired or not for us
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import jwt

from core.clock import Clock, system_clock
from core.errors import KeypulseError
from core.settings import Settings

MAX_TOKEN_CHARS = 8192
ADMIN_ROLE = "admin"


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
    """A signed token for `user_id` with the configured secret, algorithm, issuer, audience."""
    if not user_id or len(user_id) > 128:
        msg = "user id must be 1..128 characters"
        raise AuthError(msg)
    if ttl_seconds <= 0:
        msg = "ttl must be positive"
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
    if not token or len(token) > MAX_TOKEN_CHARS:
        msg = "invalid token"
        raise AuthError(msg)
    try:
        claims = jwt.decode(
            token,
            settings.jwt_key,
            algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={
                "require": ["exp", "sub", "aud", "iss"],
                # time claims are checked below against the injectable clock
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.PyJWTError as exc:
        msg = f"invalid token: {exc}"
        raise AuthError(msg) from None
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
    if not isinstance(sub, str) or not 1 <= len(sub) <= 128 or sub == "*":
        msg = "invalid token: bad subject"
        raise AuthError(msg)
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        msg = "invalid token: roles must be a list of strings"
        raise AuthError(msg)
    now = clock()
    leeway = settings.jwt_leeway_seconds
    exp = _number(claims, "exp")
    if exp is None or now > exp + leeway:
        msg = "invalid token: expired"
        raise AuthError(msg)
    nbf = _number(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        msg = "invalid token: not yet valid"
        raise AuthError(msg)
    return Principal(user_id=sub, roles=tuple(roles), expires_at=float(exp))


def _number(claims: dict[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        msg = f"invalid token: {name} must be a number"
        raise AuthError(msg)
    return float(value)
