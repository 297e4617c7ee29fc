"""WSGI middleware (Flask, Django, Bottle…) with the blocking client: verifies the request's
key, answers 401/403/429 itself, and puts the verified key in ``environ["keypal"]``."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from .client import Keypal
from .http import Guard, denial

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def _headers(environ: Environ) -> list[tuple[str, str]]:
    found = [("authorization", environ.get("HTTP_AUTHORIZATION")), ("x-api-key", environ.get("HTTP_X_API_KEY"))]
    return [(k, v) for k, v in found if v is not None]


class KeypalWSGIMiddleware:
    def __init__(self, app: WSGIApp, keys: Keypal, guard: Guard[Environ] | None = None, **options: Any):
        self.app = app
        self.keys = keys
        self.guard: Guard[Environ] = guard or Guard(**options)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        result = self.keys.verify(_headers(environ), **self.guard.options(environ, lambda e: e.get("REMOTE_ADDR")))
        refused = denial(result)
        if refused is None:
            environ["keypal"] = result
            return self.app(environ, start_response)
        body = json.dumps(refused.body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *refused.headers.items()]
        start_response(f"{refused.status} {_REASONS[refused.status]}", headers)
        return [body]


_REASONS = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests"}
