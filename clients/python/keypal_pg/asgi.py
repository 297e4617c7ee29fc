"""Pure ASGI middleware (Starlette, FastAPI, Litestar, Quart…): verifies the key of every HTTP
request and WebSocket handshake, answers a refusal itself (401/403/429; a WebSocket handshake
gets the same answer where the server supports it, else close code 1008 with the code as reason), and puts the verified key in ``scope["state"]["keypal"]``
(Starlette: ``request.state.keypal``). Only ``lifespan`` passes unchecked."""

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


async def send_denial(d: Denial, send: Send, kind: str = "http.response") -> None:
    body = json.dumps(d.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in d.headers.items()]
    await send({"type": f"{kind}.start", "status": d.status, "headers": headers})
    await send({"type": f"{kind}.body", "body": body})


class KeypalMiddleware:
    def __init__(self, app: ASGIApp, keys: AsyncKeypal, guard: Guard[Scope] | None = None, **options: Any):
        self.app = app
        self.keys = keys
        self.guard: Guard[Scope] = guard or Guard(**options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        result = await self.keys.verify(headers, **self.guard.options(scope, client_ip))
        refused = denial(result)
        if refused and scope["type"] == "websocket":
            # The same HTTP answer where the server can send one before the handshake (the
            # websocket.http.response extension), else a close: the server refuses the upgrade.
            if "websocket.http.response" in scope.get("extensions", {}):
                await send_denial(refused, send, "websocket.http.response")
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": refused.code})
            return
        if refused:
            await send_denial(refused, send)
            return
        scope.setdefault("state", {})["keypal"] = result
        await self.app(scope, receive, send)
