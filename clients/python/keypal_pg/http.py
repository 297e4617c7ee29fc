"""What the web helpers share: the key-bearing headers, and which HTTP answer a failed verify
becomes. Pure: no I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar, cast

from .types import ErrorCode, VerifyOptions, VerifyResult

Req = TypeVar("Req")
Headers = Mapping[str, str] | Iterable[tuple[str, str]]

_FORBIDDEN = {"ENV_MISMATCH", "IP_NOT_ALLOWED", "REGION_NOT_ALLOWED", "INSUFFICIENT_SCOPE"}
_LIMITED = {"RATE_LIMITED", "QUOTA_EXCEEDED"}
KEY_HEADERS = ("authorization", "x-api-key")


@dataclass(frozen=True)
class Denial:
    status: int
    code: ErrorCode
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> dict[str, str]:
        return {"error": self.message, "code": self.code}


def denial(result: VerifyResult) -> Denial | None:
    """401 when the key itself is bad (missing, malformed, unknown, revoked, disabled,
    expired), 403 when it is good but not for this request, 429 with Retry-After (whole
    seconds, at least 1) over a rate limit or quota. None when valid."""
    if result.valid:
        return None
    code: ErrorCode = result.error_code or "INVALID_KEY"
    message = result.error or "Invalid API key"
    headers: dict[str, str] = {}
    if code in _FORBIDDEN:
        status = 403
    elif code in _LIMITED:
        status = 429
        if result.retry_after_ms is not None:
            headers["Retry-After"] = str(max(1, -(-result.retry_after_ms // 1000)))
    else:
        status = 401
        headers["WWW-Authenticate"] = "Bearer" if code == "MISSING_KEY" else 'Bearer error="invalid_token"'
    return Denial(status, code, message, headers)


def key_headers(headers: Headers) -> dict[str, str]:
    """The key-bearing headers, names lower-cased, first value of each (the database reads
    them: ``Authorization: Bearer`` first, then ``x-api-key``)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        lower = name.lower()
        # JSON cannot carry NUL to PostgreSQL: such a value is no key (and must not be echoed).
        if lower in KEY_HEADERS and lower not in out and "\0" not in value:
            out[lower] = value
    return out


def plain_ip(ip: str | None) -> str | None:
    """``::ffff:10.0.0.1`` (IPv4 on a dual-stack socket) → ``10.0.0.1``; anything that is not an
    address (a Unix socket, a test client's name) → None: no address, so an allow list refuses."""
    if not ip:
        return None
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


@dataclass(frozen=True)
class Guard(Generic[Req]):
    """What a request must pass: each field may be a value or a function of the framework's
    request (FastAPI's Request, an ASGI scope, a WSGI environ). ``ip=False`` sends no address;
    by default the framework's client address is sent (so a key's ip rules apply)."""

    scope: str | None = None
    scopes: list[str] | None = None
    resource: str | Callable[[Req], str | None] | None = None
    env: str | None = None
    cost: int | Callable[[Req], int | None] | None = None
    ip: bool | Callable[[Req], str | None] = True
    country: Callable[[Req], str | None] | None = None

    def options(self, req: Req, client_ip: Callable[[Req], str | None]) -> VerifyOptions:
        def pick(v: Any) -> Any:
            return v(req) if callable(v) else v

        ip = client_ip(req) if self.ip is True else (self.ip(req) if callable(self.ip) else None)
        found = {"scope": self.scope, "scopes": self.scopes, "resource": pick(self.resource), "env": self.env,
                 "cost": pick(self.cost), "ip": plain_ip(ip), "country": pick(self.country)}  # fmt: skip
        return cast(VerifyOptions, {k: v for k, v in found.items() if v is not None})
