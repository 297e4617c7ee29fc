"""FastAPI dependency: ``key: VerifyResult = Depends(require_key(keys, scope="read"))``.

A refused key raises HTTPException (401/403/429 with WWW-Authenticate or Retry-After); the body
is FastAPI's ``{"detail": {"error": …, "code": …}}``."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import HTTPException, Request

from .client import AsyncKeypal
from .http import Guard, denial
from .types import VerifyResult


def _client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def require_key(keys: AsyncKeypal, guard: Guard[Request] | None = None, **options: Any) -> Callable[[Request], Awaitable[VerifyResult]]:
    rule: Guard[Request] = guard or Guard(**options)

    async def verified_key(request: Request) -> VerifyResult:
        result = await keys.verify(request.headers.items(), **rule.options(request, _client_ip))
        refused = denial(result)
        if refused:
            raise HTTPException(refused.status, detail=refused.body, headers=refused.headers)
        request.state.keypal = result
        return result

    return verified_key
