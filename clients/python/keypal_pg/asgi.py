"""Pure ASGI middleware (Starlette, FastAPI, Litestar, Quart…): verifies the request's key,
answers 401/403/429 itself, and puts the verified key in ``scope["state"]["keypal"]``
(Starlette: ``request.state.keypal``)."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, MutableMapping

from .client import AsyncKeypal
from .http import Denial, Guard, denial

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def client_ip(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


async def send_denial(d: Denial, send: Send) -> None:
    body = json.dumps(d.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in d.headers.items()]
    await send({"type": "http.response.start", "status": d.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KeypalMiddleware:
    def __init__(self, app: ASGIApp, keys: AsyncKeypal, guard: Guard[Scope] | None = None, **options: Any):
        self.app = app
        self.keys = keys
        self.guard: Guard[Scope] = guard or Guard(**options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        result = await self.keys.verify(headers, **self.guard.options(scope, client_ip))
        refused = denial(result)
        if refused:
            await send_denial(refused, send)
            return
        scope.setdefault("state", {})["keypal"] = result
        await self.app(scope, receive, send)
