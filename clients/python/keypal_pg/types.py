"""Result rows and option dictionaries; field names are the SQL columns and arguments."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, Required, TypedDict
from uuid import UUID

ErrorCode = Literal[
    "MISSING_KEY", "INVALID_FORMAT", "INVALID_KEY", "REVOKED", "DISABLED", "EXPIRED", "ENV_MISMATCH",
    "IP_NOT_ALLOWED", "REGION_NOT_ALLOWED", "INSUFFICIENT_SCOPE", "RATE_LIMITED", "QUOTA_EXCEEDED",
]  # fmt: skip

Id = UUID | str
When = datetime | str


class RateLimit(TypedDict):
    requests: int
    window: str


class Quota(TypedDict, total=False):
    limit: int
    period: Literal["day", "week", "month", "year"]
    on_exceeded: Literal["block", "warn", "throttle"]


class _Described(TypedDict, total=False):
    name: str
    description: str
    scopes: list[str]
    resources: dict[str, list[str]]
    tags: list[str]
    metadata: dict[str, Any]


class _Limits(TypedDict, total=False):
    rate_limit: RateLimit | None  # None: no rate limit for this key
    quota: Quota | None
    allowed_ips: list[str]
    blocked_ips: list[str]
    allowed_regions: list[str]
    blocked_regions: list[str]


class _Timing(TypedDict, total=False):
    expires_in: str
    expires_at: When


class _Schedules(TypedDict, total=False):
    disable_at: When
    revoke_at: When
    notify_before: str


class CreateOptions(_Described, _Limits, _Timing, _Schedules, total=False):
    env: str
    org_id: str
    parent_id: Id
    policy: str
    signing: bool
    actor: str


class CreateSpec(CreateOptions, total=False):
    """One key of ``create_many``: the options of ``create`` with its ``owner_id``."""

    owner_id: Required[str]


class RotateOptions(_Described, _Limits, _Timing, total=False):
    grace: str
    actor: str


class UpdateOptions(_Described, _Limits, _Timing, _Schedules, total=False):
    org_id: str
    actor: str


class ListOptions(TypedDict, total=False):
    owner_id: str
    org_id: str
    tag: str
    tags: list[str]
    env: str
    include_revoked: bool
    limit: int
    offset: int


class VerifyOptions(TypedDict, total=False):
    scope: str
    scopes: list[str]
    resource: str
    ip: str
    country: str
    env: str
    cost: int


@dataclass(frozen=True)
class CreatedKey:
    key: str  # the plaintext: shown once, stored nowhere
    id: UUID
    expires_at: datetime | None
    env: str | None
    signing_secret: str | None


@dataclass(frozen=True)
class RotatedKey:
    key: str
    id: UUID
    old_id: UUID
    expires_at: datetime | None
    env: str | None
    signing_secret: str | None


@dataclass(frozen=True)
class VerifyResult:
    valid: bool
    error_code: ErrorCode | None
    error: str | None
    key_id: UUID | None
    owner_id: str | None
    org_id: str | None
    env: str | None
    name: str | None
    scopes: list[str] | None
    resources: dict[str, list[str]] | None
    tags: list[str] | None
    metadata: dict[str, Any] | None
    expires_at: datetime | None
    rate_limited: bool
    retry_after_ms: int | None
    rate_limit_remaining: int | None
    quota_remaining: int | None


@dataclass(frozen=True)
class ApiKeyRecord:
    id: UUID
    owner_id: str | None
    org_id: str | None
    env: str | None
    name: str | None
    description: str | None
    scopes: list[str] | None
    resources: dict[str, list[str]] | None
    tags: list[str] | None
    metadata: dict[str, Any] | None
    enabled: bool
    created_at: datetime
    updated_at: datetime | None
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    revoke_reason: str | None
    revoked_by: str | None
    rotated_from: UUID | None
    rotated_to: UUID | None
    parent_id: UUID | None
    policy: str | None
    rate_limit: RateLimit | None
    quota: Quota | None
    allowed_ips: list[str] | None
    blocked_ips: list[str] | None
    allowed_regions: list[str] | None
    blocked_regions: list[str] | None
    disable_at: datetime | None
    revoke_at: datetime | None
    notify_before: timedelta | None
    algorithm: str


@dataclass(frozen=True)
class Usage:
    used: int
    limit: int | None
    remaining: int | None
    resets_at: datetime | None
    period: str | None
    tokens: int
    cost: Decimal
