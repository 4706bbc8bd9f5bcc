"""The dashboard's files (api/routes/web.py) and the dev sign-in (api/routes/dev.py), in memory.

The page itself is tested in a browser (tests/browser); here: what is served, with which
headers, and that dev sign-in exists only in dev mode and only for this server's pages.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from api import create_app
from api.routes import web
from core.auth import verify_token
from core.clock import ManualClock
from core.settings import Settings, load


def test_the_page_and_its_files_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["cache-control"] == "no-cache"
    assert 'data-mode="dev"' in page.text  # the test app is in dev mode
    for name, kind in (("app.js", "text/javascript"), ("styles.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        answer = client.get(f"/web/{name}")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith(kind)
        assert answer.headers["x-content-type-options"] == "nosniff"
        again = client.get(f"/web/{name}", headers={"If-None-Match": answer.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    head = client.head("/web/app.js")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(client.get("/web/app.js").content)


def test_only_the_pages_files_are_served(client: TestClient) -> None:
    for path in ("/web/__init__.py", "/web/index.html", "/web/../routes/web.py",
                 "/web/%2e%2e%2fapp.py", "/web/nope.js", "/web/"):
        answer = client.get(path)
        assert answer.status_code == 404, path
        if answer.headers["content-type"].startswith("application/json"):
            assert answer.json()["error"]["code"] == "not_found"


def test_no_inline_script_or_style_in_the_page() -> None:
    """The policy forbids them: the page would break in the browser, silently."""
    html = (web.WEB_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    for script in Path(web.WEB_DIR).glob("*.js"):
        text = script.read_text()
        assert "innerHTML" not in text, script.name  # text nodes only: no markup from data
        assert 'setAttribute("style"' not in text, script.name


def test_the_page_does_not_shadow_an_api_route(client: TestClient) -> None:
    assert client.get("/healthz").headers["content-type"].startswith("application/json")
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    assert "/" not in client.get("/openapi.json").json()["paths"]  # not an API operation


def test_dev_token_mints_a_short_lived_token(client: TestClient, api_settings: Settings,
                                             clock: ManualClock) -> None:
    answer = client.post("/v1/dev/token", json={"user_id": "usr_demo", "role": "admin"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    principal = verify_token(api_settings, body["token"], clock=clock)
    assert principal.user_id == "usr_demo" and principal.roles == ("admin",)
    assert body["expires_at"] - clock() <= 8 * 3600
    assert client.post("/v1/dev/token", json={"user_id": "u"}).json()["roles"] == ["user"]


def test_dev_token_refuses_bad_input_and_other_origins(client: TestClient) -> None:
    for body in ({"user_id": "u", "role": "root"}, {"user_id": ""}, {"user_id": "*"}, {}):
        answer = client.post("/v1/dev/token", json=body)
        assert answer.status_code == 422, body
        assert answer.json()["error"]["code"]
    other = client.post("/v1/dev/token", json={"user_id": "u"},
                        headers={"Origin": "https://evil.example"})
    assert other.status_code == 403
    same = client.post("/v1/dev/token", json={"user_id": "u"},
                       headers={"Origin": "http://testserver"})
    assert same.status_code == 200


def test_dev_routes_do_not_exist_outside_dev_mode(tmp_path: Path) -> None:
    # a server nobody answers: an embedded store opened here would stay open for the process
    settings = load(dev=False, jwt_secret="x" * 40, data_dir=tmp_path,
                    kafka_bootstrap="127.0.0.1:1", clickhouse_dsn="http://127.0.0.1:1/keypulse")
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/dev/token", json={"user_id": "u"}).status_code == 404
        assert client.get("/v1/dev/users").status_code == 404
        page = client.get("/")
        assert page.status_code == 200 and 'data-mode="prod"' in page.text
