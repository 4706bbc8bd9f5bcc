"""Authentication: the token matrix, header and frame paths, silence, expiry; no frame leaks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.auth import AuthError, mint_token, verify_token
from core.clock import ManualClock
from core.settings import Settings
from schemas.ws import client_frame
from tests.ws.harness import expect, open_ws, recv, send, token
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
    }


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


def test_bad_tokens_close_4401_without_data(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False, clock=ManualClock(NOW))

    async def main() -> None:
        for name, bad in bad_tokens(unit_settings).items():
            code = await _rejected(server.url, [client_frame("authenticate", {"token": bad})])
            assert code == 4401, name
            code = await _rejected(server.url, [], {"Authorization": f"Bearer {bad}"})
            assert code == 4401, name

    asyncio.run(main())
    assert server.bridge.registry.total == 0
    assert server.bridge.stats.auth_failures == 2 * len(bad_tokens(unit_settings))


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


def test_expiry_closes_socket(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False)

    async def main() -> None:
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": token(unit_settings, "alice", ttl=1)})
        await expect(ws, "authenticated")
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await recv(ws, timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4401

    asyncio.run(main())


def test_reauthenticate_extends_and_keeps_user(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False)

    async def main() -> None:
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": token(unit_settings, "alice", ttl=1)})
        await expect(ws, "authenticated")
        await send(ws, "authenticate", {"token": token(unit_settings, "alice", ttl=60)})
        frame, data = await expect(ws, "authenticated")
        assert frame.seq == 2 and data.expires_at > time.time() + 30
        await send(ws, "authenticate", {"token": token(unit_settings, "bob")})
        _, err = await expect(ws, "error")
        assert err.code == "forbidden_user"
        await asyncio.sleep(1.5)  # past the first token's expiry: still open
        await send(ws, "ping", {"nonce": "n"})
        _, pong = await expect(ws, "pong")
        assert pong.nonce == "n"
        await ws.close()

    asyncio.run(main())


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
