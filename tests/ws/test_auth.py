"""Authentication: the token matrix (forged and odd signed tokens), header and frame paths,
silence, expiry on the injected clock, re-authentication (same user, roles re-checked);
no frame leaks and no traceback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.auth import MAX_TOKEN_CHARS, AuthError, mint_token, verify_token
from core.clock import ManualClock
from core.settings import Settings
from schemas.ws import client_frame
from tests.ws.harness import expect, login, open_ws, quiet, recv, send, token
from ws_bridge import Limits

NOW = 1_700_000_000


def _claims(settings: Settings, **over: object) -> dict[str, object]:
    claims: dict[str, object] = {"sub": "alice", "roles": [], "iss": settings.jwt_issuer,
                                 "aud": settings.jwt_audience, "iat": NOW, "exp": NOW + 600}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(settings: Settings, claims: dict[str, object]) -> str:
    return jwt.encode(claims, settings.jwt_key, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_hs256(claims: dict[str, object], key: bytes) -> str:
    signing_input = (_b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(
        json.dumps(claims).encode())).encode()
    mac = hmac.new(key, signing_input, hashlib.sha256).digest()
    return signing_input.decode() + "." + _b64(mac)


def _hand_signed(settings: Settings, payload: str) -> str:
    """HS256 over a payload written by hand (JSON that json.dumps would not write)."""
    signing_input = (_b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(payload.encode()))
    mac = hmac.new(settings.jwt_key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(mac)


def odd_signed_tokens(settings: Settings) -> dict[str, str]:
    """Correctly signed, oddly shaped: each must be refused with AuthError, nothing else."""
    key = settings.jwt_key.encode()
    long_ttl = settings.jwt_max_ttl_seconds + 1
    no_iat = {k: v for k, v in _claims(settings).items() if k != "iat"}
    claims = _claims(settings)
    return {
        "exp_10_pow_400": _hand_hs256(_claims(settings, exp=10**400), key),
        "iat_10_pow_400": _hand_hs256(_claims(settings, iat=10**400), key),
        "nbf_4400_digits": _hand_signed(settings, json.dumps(claims)[:-1]
                                        + ', "nbf": ' + "9" * 4400 + "}"),
        "exp_negative": _sign(settings, _claims(settings, exp=-1)),
        "exp_nan": _hand_hs256(_claims(settings, exp=float("nan")), key),
        "exp_infinity": _hand_hs256(_claims(settings, exp=float("inf")), key),
        "exp_string": _sign(settings, _claims(settings, exp=str(NOW + 600))),
        "exp_bool": _sign(settings, _claims(settings, exp=True)),
        "sub_lone_surrogate": _hand_hs256(_claims(settings, sub="\ud800"), key),
        "sub_control_char": _sign(settings, _claims(settings, sub="ali\x00ce")),
        "sub_int": _hand_hs256(_claims(settings, sub=5), key),
        "sub_list": _hand_hs256(_claims(settings, sub=["alice"]), key),
        "sub_empty": _hand_hs256(_claims(settings, sub=""), key),
        "sub_too_long": _sign(settings, _claims(settings, sub="a" * 129)),
        "sub_broadcast": _sign(settings, _claims(settings, sub="*")),
        "roles_dict": _sign(settings, _claims(settings, roles={"admin": True})),
        "roles_ints": _sign(settings, _claims(settings, roles=[1, 2])),
        "roles_nested": _sign(settings, _claims(settings, roles=[["admin"]])),
        "roles_too_many": _sign(settings, _claims(settings, roles=[f"r{i}" for i in range(33)])),
        "role_surrogate": _hand_hs256(_claims(settings, roles=["\udfff"]), key),
        "deep_payload": _hand_signed(settings, '{"sub":' + "[" * 2500 + "]" * 2500 + "}"),
        "payload_a_list": _hand_signed(settings, "[1, 2]"),
        "lifetime_over_max": _sign(settings, _claims(settings, exp=NOW + long_ttl)),
        "lifetime_over_max_no_iat": _sign(settings, {**no_iat, "exp": NOW + long_ttl}),
        "iat_in_future": _sign(settings, _claims(settings, iat=NOW + 300)),
        "huge": "e" * (MAX_TOKEN_CHARS + 1),
        "non_ascii": _sign(settings, claims) + "é",
    }


def bad_tokens(settings: Settings) -> dict[str, str]:
    good = _sign(settings, _claims(settings))
    head, payload, sig = good.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = "mallory"
    none_token = _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(
        json.dumps(_claims(settings)).encode()) + "."
    public_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(
    ).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # HS256 "signed" with the RS256 public key, by hand (PyJWT refuses PEM keys as secrets)
    confused = _hand_hs256(_claims(settings), public_pem)
    return {
        "alg_none": none_token,
        "hs256_with_rsa_public_key": confused,
        "expired": _sign(settings, _claims(settings, exp=NOW - 60)),
        "nbf_in_future": _sign(settings, _claims(settings, nbf=NOW + 600)),
        "wrong_aud": _sign(settings, _claims(settings, aud="someone-else")),
        "wrong_iss": _sign(settings, _claims(settings, iss="evil")),
        "iss_contains_expected": _sign(settings, _claims(settings,
                                                         iss=f"x{settings.jwt_issuer}x")),
        "iss_list": _hand_hs256(_claims(settings, iss=[settings.jwt_issuer]),
                                settings.jwt_key.encode()),
        "tampered_payload": f"{head}.{_b64(json.dumps(forged).encode())}.{sig}",
        "missing_sub": _sign(settings, _claims(settings, sub=None)),
        "missing_exp": _sign(settings, _claims(settings, exp=None)),
        "wrong_secret": jwt.encode(_claims(settings), "x" * 40, algorithm="HS256"),
        "hs512": jwt.encode(_claims(settings), settings.jwt_key * 2, algorithm="HS512"),
        "roles_not_list": _sign(settings, _claims(settings, roles="admin")),
        "garbage": "not.a.jwt",
        **odd_signed_tokens(settings),
    }


@pytest.fixture
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """Records of ERROR and above logged by uvicorn (an exception in the app) or the bridge."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "ws_bridge", "core")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def test_verify_matrix(unit_settings: Settings) -> None:
    clock = ManualClock(NOW)
    good = _sign(unit_settings, _claims(unit_settings, roles=["admin"]))
    principal = verify_token(unit_settings, good, clock=clock)
    assert principal.user_id == "alice" and principal.is_admin
    for name, bad in bad_tokens(unit_settings).items():
        with pytest.raises(AuthError):
            verify_token(unit_settings, bad, clock=clock)
            pytest.fail(name)


def test_leeway(unit_settings: Settings) -> None:
    leeway = unit_settings.jwt_leeway_seconds
    tok = _sign(unit_settings, _claims(unit_settings, exp=NOW))
    verify_token(unit_settings, tok, clock=ManualClock(NOW + leeway - 1))
    with pytest.raises(AuthError):
        verify_token(unit_settings, tok, clock=ManualClock(NOW + leeway + 1))


def test_mint_roundtrip(unit_settings: Settings) -> None:
    clock = ManualClock(NOW)
    tok = mint_token(unit_settings, "bob", roles=["admin"], ttl_seconds=60, clock=clock)
    principal = verify_token(unit_settings, tok, clock=clock)
    assert principal == principal.__class__("bob", ("admin",), NOW + 60)


def test_max_lifetime(unit_settings: Settings) -> None:
    """exp - iat (or exp - now without iat) may be jwt_max_ttl_seconds, not a second more;
    mint_token refuses to write what verify_token would refuse."""
    clock = ManualClock(NOW)
    most = unit_settings.jwt_max_ttl_seconds
    tok = mint_token(unit_settings, "bob", ttl_seconds=most, clock=clock)
    assert verify_token(unit_settings, tok, clock=clock).expires_at == NOW + most
    no_iat = {k: v for k, v in _claims(unit_settings).items() if k != "iat"}
    verify_token(unit_settings, _sign(unit_settings, {**no_iat, "exp": NOW + most}), clock=clock)
    with pytest.raises(AuthError, match="lives longer"):
        verify_token(unit_settings, _sign(unit_settings, {**no_iat, "exp": NOW + most + 1}),
                     clock=clock)
    # an old token issued long ago with a long exp: its lifetime counts from iat, not now
    old = _sign(unit_settings, _claims(unit_settings, iat=NOW - most, exp=NOW + 60))
    with pytest.raises(AuthError, match="lives longer"):
        verify_token(unit_settings, old, clock=clock)
    for bad in ({"ttl_seconds": most + 1}, {"user_id": "\ud800"}, {"user_id": "*"},
                {"roles": ["x" * 65]}):
        with pytest.raises(AuthError):
            mint_token(unit_settings, **{"user_id": "bob", "clock": clock, **bad})  # type: ignore[arg-type]


async def _rejected(url: str, frames: list[str], headers: dict[str, str] | None = None) -> int:
    """Close code after sending `frames`; fails if any data frame arrives."""
    ws = await open_ws(url, additional_headers=headers or {})
    with pytest.raises(ConnectionClosed) as info:
        for frame in frames:
            await ws.send(frame)
        text = await asyncio.wait_for(ws.recv(), 5)
        pytest.fail(f"a frame leaked: {text}")
    assert info.value.rcvd is not None
    return info.value.rcvd.code


def test_bad_tokens_close_4401_without_data(unit_settings: Settings, bridges,  # type: ignore[no-untyped-def]
                                            server_errors: list[logging.LogRecord]) -> None:
    server = bridges(unit_settings, kafka=False, clock=ManualClock(NOW))
    tokens = bad_tokens(unit_settings)
    # (a header line over 8 KiB is the HTTP server's to refuse, before the bridge sees it)
    header_safe = {name: t for name, t in tokens.items()
                   if t.isascii() and len(t) <= MAX_TOKEN_CHARS}

    async def main() -> None:
        for name, bad in tokens.items():
            code = await _rejected(server.url, [client_frame("authenticate", {"token": bad})])
            assert code == 4401, name
        for name, bad in header_safe.items():
            code = await _rejected(server.url, [], {"Authorization": f"Bearer {bad}"})
            assert code == 4401, name

    asyncio.run(main())
    assert server.bridge.registry.total == 0
    assert server.bridge.stats.auth_failures == len(tokens) + len(header_safe)
    assert server_errors == []  # refused cleanly: no traceback anywhere


def test_first_frame_must_authenticate(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False)

    async def main() -> None:
        assert await _rejected(server.url, [client_frame("ping")]) == 4401
        assert await _rejected(server.url, ["{not json"]) == 4401
        assert await _rejected(server.url, [client_frame("authenticate", {"tok": "x"})]) == 4401
        # a token in the query string is refused even when valid
        good = token(unit_settings, "alice")
        code = await _rejected(f"{server.url}?token={good}",
                               [client_frame("authenticate", {"token": good})])
        assert code == 4401

    asyncio.run(main())


def test_silence_closes_4401(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False, limits=Limits(auth_timeout=0.3))

    async def main() -> None:
        started = time.monotonic()
        assert await _rejected(server.url, []) == 4401
        assert time.monotonic() - started < 3

    asyncio.run(main())


def test_header_and_frame_auth(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False)

    async def main() -> None:
        ws = await open_ws(server.url, additional_headers={
            "Authorization": f"Bearer {token(unit_settings, 'alice', 'admin')}"})
        frame, data = await expect(ws, "authenticated")
        assert (data.user_id, data.roles, frame.seq) == ("alice", ["admin"], 1)
        assert data.connection_id and data.cursor
        await ws.close()
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": token(unit_settings, "bob")})
        _, data = await expect(ws, "authenticated")
        assert data.user_id == "bob" and data.roles == []
        await ws.close()

    asyncio.run(main())


async def _closed_with(ws, timeout: float = 5) -> int:  # type: ignore[no-untyped-def]
    """The close code once the server closes `ws`; fails on any frame meanwhile."""
    with pytest.raises(ConnectionClosed) as info:
        text = await asyncio.wait_for(ws.recv(), timeout)
        pytest.fail(f"a frame arrived: {text}")
    assert info.value.rcvd is not None
    return info.value.rcvd.code


def test_expiry_closes_socket(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    """On the injected clock: a frame after exp closes 4401 (no pong), and an idle socket
    whose token is already at exp (accepted within the leeway) is closed by the timer."""
    clock = ManualClock(NOW)
    server = bridges(unit_settings, kafka=False, clock=clock)

    def tok(ttl: float, issued: float = NOW) -> str:
        return mint_token(unit_settings, "alice", ttl_seconds=ttl, clock=ManualClock(issued))

    async def main() -> None:
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": tok(60)})
        _, auth = await expect(ws, "authenticated")
        assert auth.expires_at == NOW + 60
        await send(ws, "ping", {"nonce": "before"})
        await expect(ws, "pong")
        clock.advance(60)
        await send(ws, "ping", {"nonce": "after"})
        assert await _closed_with(ws) == 4401

        ws = await open_ws(server.url)  # exp == now: valid within the leeway, expires at once
        await send(ws, "authenticate", {"token": tok(60, issued=clock.now - 60)})
        await expect(ws, "authenticated")
        assert await _closed_with(ws) == 4401

    asyncio.run(main())
    assert server.bridge.registry.total == 0


def test_reauthenticate_extends_and_keeps_user(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock(NOW)
    server = bridges(unit_settings, kafka=False, clock=clock)

    def tok(user: str, ttl: float) -> str:
        return mint_token(unit_settings, user, ttl_seconds=ttl, clock=clock)

    async def main() -> None:
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": tok("alice", 60)})
        await expect(ws, "authenticated")
        await send(ws, "authenticate", {"token": tok("alice", 600)})
        frame, data = await expect(ws, "authenticated")
        assert frame.seq == 2 and data.expires_at == NOW + 600
        await send(ws, "authenticate", {"token": tok("bob", 600)})
        _, err = await expect(ws, "error")
        assert err.code == "forbidden_user"
        clock.advance(120)  # past the first token's expiry: still open
        await send(ws, "ping", {"nonce": "n"})
        _, pong = await expect(ws, "pong")
        assert pong.nonce == "n"
        clock.advance(480)  # the second one's
        await send(ws, "ping", {"nonce": "late"})
        assert await _closed_with(ws) == 4401

    asyncio.run(main())


def test_reauthenticate_without_admin_stops_monitoring(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False, monitor_interval=0.05)

    async def main() -> None:
        ws, auth = await login(server.url, unit_settings, "root", "admin")
        assert auth.roles == ["admin"]
        await send(ws, "subscribe_monitoring")
        await expect(ws, "system_stats")
        await expect(ws, "system_stats")  # and again, every interval
        await send(ws, "authenticate", {"token": token(unit_settings, "root")})
        while True:  # system_stats written before the new token was seen may still arrive
            frame, data = await recv(ws)
            if frame.event == "authenticated":
                break
            assert frame.event == "system_stats", frame.event
        assert data.roles == []
        await quiet(ws, 0.5)  # ten intervals without a system_stats
        await send(ws, "subscribe_monitoring")
        _, err = await expect(ws, "error")
        assert err.code == "forbidden"
        await ws.close()

    asyncio.run(main())
    assert not server.bridge.registry.monitors


def test_origin_allow_list(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    listed = unit_settings.model_copy(update={"ws_allowed_origins": ["https://app.example"]})
    open_server = bridges(unit_settings, kafka=False)
    listed_server = bridges(listed, kafka=False)

    async def main() -> None:
        # empty list: same host only
        host = f"127.0.0.1:{open_server.port}"
        ws = await open_ws(open_server.url, origin=f"http://{host}")  # type: ignore[arg-type]
        await ws.close()
        with pytest.raises(InvalidStatus) as info:
            await open_ws(open_server.url, origin="https://evil.example")  # type: ignore[arg-type]
        assert info.value.response.status_code == 403
        ws = await open_ws(listed_server.url, origin="https://app.example")  # type: ignore[arg-type]
        await ws.close()
        with pytest.raises(InvalidStatus):
            await open_ws(listed_server.url, origin="https://evil.example")  # type: ignore[arg-type]

    asyncio.run(main())


def test_reauthenticate_with_odd_tokens_keeps_the_socket(unit_settings: Settings, bridges,  # type: ignore[no-untyped-def]
                                                         server_errors: list[logging.LogRecord]
                                                         ) -> None:
    """On an open socket, each odd signed token earns an error frame; the socket and its
    user stay as they were."""
    clock = ManualClock(NOW)
    server = bridges(unit_settings, kafka=False, clock=clock,
                     limits=Limits(rate=1000, burst=1000))
    odd = odd_signed_tokens(unit_settings)

    async def main() -> None:
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": _sign(unit_settings, _claims(unit_settings))})
        await expect(ws, "authenticated")
        for name, bad in odd.items():
            await send(ws, "authenticate", {"token": bad})
            _, err = await expect(ws, "error")
            assert err.code in ("not_authenticated", "invalid_data"), name
        await send(ws, "ping", {"nonce": "alive"})
        _, pong = await expect(ws, "pong")
        assert pong.nonce == "alive"
        await ws.close()

    asyncio.run(main())
    assert server_errors == []
