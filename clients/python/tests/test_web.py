"""FastAPI (dependency), the ASGI middleware and the WSGI middleware, each behind a real server
on 127.0.0.1 (uvicorn; wsgiref), connected as a role that may only verify: every status code."""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterator

import json

import httpx
import pytest
from fastapi import Depends, FastAPI, Request, WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import conninfo, serve_asgi, serve_wsgi, sync_client
from keypal_pg import AsyncKeypal, Keypal, VerifyResult
from keypal_pg.asgi import KeypalMiddleware
from keypal_pg.fastapi import require_key
from keypal_pg.wsgi import KeypalWSGIMiddleware


def async_web() -> AsyncKeypal:
    return AsyncKeypal(conninfo("keypal_web"), min_size=1, max_size=4)


def fastapi_app() -> ContextManager[str]:
    keys = async_web()
    app = FastAPI(lifespan=keys.lifespan)

    @app.get("/api/data")
    async def data(key: VerifyResult = Depends(require_key(keys, scope="read"))) -> dict[str, Any]:
        return {"owner": key.owner_id}

    return serve_asgi(app)


def asgi_app() -> ContextManager[str]:
    keys = async_web()
    app = FastAPI(lifespan=keys.lifespan)

    @app.get("/api/data")
    async def data(request: Request) -> dict[str, Any]:
        return {"owner": request.state.keypal.owner_id}

    app.add_middleware(KeypalMiddleware, keys=keys, scope="read")
    return serve_asgi(app)


def wsgi_app() -> ContextManager[str]:
    import json

    keys = sync_client("keypal_web")

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"owner": environ["keypal"].owner_id}).encode()]

    class Served:
        def __enter__(self) -> str:
            self.cm = serve_wsgi(KeypalWSGIMiddleware(app, keys, scope="read"))
            return self.cm.__enter__()

        def __exit__(self, *exc: Any) -> None:
            self.cm.__exit__(*exc)
            keys.pool.close()

    return Served()


APPS = {"fastapi": fastapi_app, "asgi": asgi_app, "wsgi": wsgi_app}


@pytest.fixture(scope="module")
def keys(admin: Keypal) -> dict[str, str]:
    owner = "py_web_owner"
    make = lambda **o: admin.create(owner, scopes=["read"], **o).key  # noqa: E731
    revoked = admin.create(owner, scopes=["read"])
    admin.revoke(revoked.id)
    good = make()
    return {
        "owner": owner,
        "good": good,
        "unknown": good[:-1] + ("B" if good.endswith("A") else "A"),
        "revoked": revoked.key,
        "no_scope": admin.create(owner, scopes=["write"]).key,
        "ip_ok": make(allowed_ips=["127.0.0.1/32"]),
        "ip_other": make(allowed_ips=["10.0.0.0/8"]),
    }


@pytest.fixture(params=list(APPS), scope="module")
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    with APPS[request.param]() as base:
        yield base


def get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{url}/api/data", headers={k.replace("_", "-"): v for k, v in headers.items()})


def code(r: httpx.Response) -> str:
    body = r.json()
    return str(body.get("detail", body)["code"])


def test_bearer_200_with_the_key_on_the_request(url: str, keys: dict[str, str]) -> None:
    r = get(url, authorization=f"Bearer {keys['good']}")
    assert r.status_code == 200
    assert r.json() == {"owner": keys["owner"]}


def test_x_api_key_200(url: str, keys: dict[str, str]) -> None:
    assert get(url, x_api_key=keys["good"]).status_code == 200


@pytest.mark.parametrize("headers, expected", [
    ({}, "MISSING_KEY"),
    ({"authorization": "Bearer not-a-key"}, "INVALID_FORMAT"),
    ({"authorization": "Bearer {unknown}"}, "INVALID_KEY"),
    ({"x_api_key": "{revoked}"}, "REVOKED"),
])  # fmt: skip
def test_401(url: str, keys: dict[str, str], headers: dict[str, str], expected: str) -> None:
    r = get(url, **{k: v.format(**keys) for k, v in headers.items()})
    assert r.status_code == 401
    assert code(r) == expected
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_403_without_the_scope(url: str, keys: dict[str, str]) -> None:
    r = get(url, authorization=f"Bearer {keys['no_scope']}")
    assert r.status_code == 403
    assert code(r) == "INSUFFICIENT_SCOPE"


def test_ip_rules_see_the_client_address(url: str, keys: dict[str, str]) -> None:
    assert get(url, authorization=f"Bearer {keys['ip_ok']}").status_code == 200
    r = get(url, authorization=f"Bearer {keys['ip_other']}")
    assert r.status_code == 403 and code(r) == "IP_NOT_ALLOWED"


def test_429_with_retry_after(url: str, admin: Keypal) -> None:
    key = admin.create("py_web_owner", scopes=["read"], rate_limit={"requests": 2, "window": "1m"}).key
    assert [get(url, x_api_key=key).status_code for _ in range(2)] == [200, 200]
    r = get(url, x_api_key=key)
    assert r.status_code == 429 and code(r) == "RATE_LIMITED"
    # Whole seconds; a sliding window can make it up to two windows away.
    assert 1 <= int(r.headers["retry-after"]) <= 120


def test_429_past_a_blocking_quota(url: str, admin: Keypal) -> None:
    key = admin.create("py_web_owner", scopes=["read"], quota={"limit": 1, "period": "day"}).key
    assert get(url, x_api_key=key).status_code == 200
    r = get(url, x_api_key=key)
    assert r.status_code == 429 and code(r) == "QUOTA_EXCEEDED"


def test_websocket_handshake_needs_a_key(keys: dict[str, str]) -> None:
    web = async_web()
    app = FastAPI(lifespan=web.lifespan)

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_json({"owner": socket.state.keypal.owner_id})
        await socket.close()

    app.add_middleware(KeypalMiddleware, keys=web, scope="read")
    with serve_asgi(app) as base:
        url = base.replace("http://", "ws://") + "/ws"
        with connect(url, additional_headers={"x-api-key": keys["good"]}) as socket:
            assert json.loads(socket.recv(timeout=5)) == {"owner": keys["owner"]}
        refusals = [({}, 401, "MISSING_KEY"), ({"x-api-key": keys["no_scope"]}, 403, "INSUFFICIENT_SCOPE")]
        for headers, status, expected in refusals:
            # uvicorn offers the websocket.http.response extension: the upgrade gets the HTTP answer.
            with pytest.raises(InvalidStatus) as refused:
                connect(url, additional_headers=headers)
            assert refused.value.response.status_code == status
            assert json.loads(refused.value.response.body or b"{}")["code"] == expected


def test_websocket_without_the_extension_is_closed_1008() -> None:
    import asyncio

    async def run() -> list[dict[str, Any]]:
        web = await async_web().open()
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(dict(message))

        async def receive() -> Any:
            return {"type": "websocket.connect"}

        async def app(*_: Any) -> None:
            raise AssertionError("the app was reached without a key")

        try:
            await KeypalMiddleware(app, web, scope="read")({"type": "websocket", "headers": [], "client": ("127.0.0.1", 1)}, receive, send)
        finally:
            await web.close()
        return sent

    assert asyncio.run(run()) == [{"type": "websocket.close", "code": 1008, "reason": "MISSING_KEY"}]


def test_a_database_failure_is_a_500_not_a_401() -> None:
    dead = AsyncKeypal("host=127.0.0.1 port=1 dbname=none user=keypal_web connect_timeout=1", min_size=1, timeout=1)
    app = FastAPI(lifespan=dead.lifespan)

    @app.get("/api/data")
    async def data(key: VerifyResult = Depends(require_key(dead, scope="read"))) -> dict[str, Any]:
        return {"owner": key.owner_id}

    with serve_asgi(app) as base:
        r = httpx.get(f"{base}/api/data", headers={"x-api-key": "sk_anything"}, timeout=10)
        assert r.status_code == 500
