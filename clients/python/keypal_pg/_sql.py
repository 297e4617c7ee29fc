"""One SQL function call with bind parameters, built from keyword options.

Every value is a parameter; the only text put into the SQL comes from the fixed argument tables
below (and the schema, quoted as an identifier).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from functools import partial
from typing import Any, Mapping
from uuid import UUID

from psycopg import sql
from psycopg.types.json import Jsonb

_DESCRIBED = {"name": "text", "description": "text", "scopes": "text[]", "resources": "jsonb", "tags": "text[]", "metadata": "jsonb"}
_LIMITS = {"rate_limit": "jsonb", "quota": "jsonb", "allowed_ips": "text[]", "blocked_ips": "text[]", "allowed_regions": "text[]", "blocked_regions": "text[]"}
_TIMING = {"expires_in": "text", "expires_at": "timestamptz"}
_SCHEDULES = {"disable_at": "timestamptz", "revoke_at": "timestamptz", "notify_before": "text"}
ACTOR = {"actor": "text"}

CREATE = {"owner_id": "text", **_DESCRIBED, **_TIMING, "env": "text", "org_id": "text", "parent_id": "uuid",
          "policy": "text", **_LIMITS, **_SCHEDULES, "signing": "boolean", **ACTOR}  # fmt: skip
ROTATE = {"grace": "text", **_DESCRIBED, **_TIMING, **_LIMITS, **ACTOR}
UPDATE = {**_DESCRIBED, **_TIMING, "org_id": "text", **_LIMITS, **_SCHEDULES, **ACTOR}
LIST = {"owner_id": "text", "org_id": "text", "tag": "text", "tags": "text[]", "env": "text",
        "include_revoked": "boolean", "limit": "integer", "offset": "integer"}  # fmt: skip
REVOKE = {"reason": "text", **ACTOR}
VERIFY = {"scope": "text", "scopes": "text[]", "resource": "text", "ip": "inet", "country": "text", "env": "text", "cost": "integer"}


@dataclass(frozen=True)
class Call:
    query: sql.Composed
    params: list[Any]


def _json_default(value: Any) -> str:
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"keypal: {type(value).__name__} is not JSON serializable")


def jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=partial(json.dumps, default=_json_default))


def _param(value: Any, type_: str) -> Any:
    # JSON null is a value keypal understands ("clear this setting"), unlike SQL NULL.
    return jsonb(value) if type_ == "jsonb" else value


def call(
    schema: str | None,
    fn: str,
    first: list[tuple[str, str, Any]],
    table: Mapping[str, str],
    options: Mapping[str, Any],
) -> Call:
    """``SELECT * FROM fn(first => %s::type, …, option => %s::type)``.

    ``first`` are always passed; of ``options`` only those set (for non-JSON arguments: not None),
    so the function's defaults apply to the rest. An unknown option raises TypeError.
    """
    args: list[sql.Composable] = []
    params: list[Any] = []

    def add(name: str, type_: str, value: Any) -> None:
        params.append(_param(value, type_))
        args.append(sql.SQL("{} => %s::{}").format(sql.Identifier(name), sql.SQL(type_)))

    for name, type_, value in first:
        add(name, type_, value)
    for name, value in options.items():
        if name not in table:
            raise TypeError(f"keypal: unknown option {name} for {fn}")
        type_ = table[name]
        if value is None and type_ != "jsonb":
            continue
        add(name, type_, value)
    target = sql.Identifier(schema, fn) if schema else sql.Identifier(fn)
    return Call(sql.SQL("SELECT * FROM {}({})").format(target, sql.SQL(", ").join(args)), params)
