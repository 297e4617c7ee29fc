"""The client against the real extension: each method, its types, and its errors."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import pytest

from conftest import conninfo
from keypal_pg import (AsyncKeypal, Keypal, KeypalError, KeypalForbiddenError, KeypalInvalidArgumentError,
                       KeypalNotFoundError, KeypalStateError, key_headers, plain_ip)  # fmt: skip


def test_create_verify_read(admin: Keypal, web: Keypal, owner: str) -> None:
    created = admin.create(owner, name="ci", scopes=["read", "write"], resources={"project:1": ["deploy"]},
                           tags=["a", "b"], metadata={"plan": "pro", "n": 3}, expires_in="30d")  # fmt: skip
    assert isinstance(created.id, UUID)
    assert len(created.key) >= 24
    assert created.expires_at is not None
    left = created.expires_at - datetime.now(timezone.utc)
    assert timedelta(days=29.9) < left <= timedelta(days=30)

    r = web.verify(created.key, scope="read")
    assert r.valid and r.error_code is None
    assert r.key_id == created.id and r.owner_id == owner
    assert r.scopes == ["read", "write"] and r.metadata == {"plan": "pro", "n": 3}
    assert web.verify(created.key, scope="deploy", resource="project:1").valid
    assert web.verify(created.key, scope="deploy").error_code == "INSUFFICIENT_SCOPE"

    rec = admin.get(created.id)
    assert rec.owner_id == owner and rec.enabled and rec.tags == ["a", "b"]
    assert isinstance(rec.created_at, datetime)
    assert rec.algorithm == "sha256"


def test_verify_reads_headers(admin: Keypal, web: Keypal, owner: str) -> None:
    key = admin.create(owner, scopes=["read"]).key
    assert web.verify({"Authorization": f"Bearer {key}"}).valid
    assert web.verify({"X-Api-Key": key}).valid
    assert web.verify([("x-api-key", key)]).valid
    assert web.verify({}).error_code == "MISSING_KEY"
    assert web.verify(None).error_code == "MISSING_KEY"
    assert web.verify("sk_short").error_code == "INVALID_FORMAT"
    assert web.verify({"authorization": "Bearer abc\0def"}).error_code == "MISSING_KEY"
    assert key_headers([("Authorization", "Bearer x"), ("authorization", "y"), ("other", "z")]) == {"authorization": "Bearer x"}


def test_values_are_bound(admin: Keypal, owner: str) -> None:
    hostile = f"o'); DROP TABLE keypal.keys; --{owner}"
    key_id = admin.create(hostile, name="%s {} \\ '").id
    rec = admin.get(key_id)
    assert rec.owner_id == hostile and rec.name == "%s {} \\ '"
    assert len(admin.list(owner_id=hostile)) == 1


def test_many(admin: Keypal, web: Keypal, owner: str) -> None:
    expires = datetime.now(timezone.utc) + timedelta(days=1)
    made = admin.create_many([{"owner_id": owner, "tags": ["many"], "scopes": ["read"], "expires_at": expires},
                              {"owner_id": owner, "tags": ["many"], "scopes": ["write"]}])  # fmt: skip
    assert len(made) == 2
    results = web.verify_many([made[1].key, "nope", made[0].key], scope="write")
    assert [r.error_code for r in results] == [None, "INVALID_FORMAT", "INSUFFICIENT_SCOPE"]
    assert sorted(k.id for k in admin.list(owner_id=owner, tag="many")) == sorted(k.id for k in made)
    assert admin.get(made[0].id).expires_at is not None


def test_lifecycle(admin: Keypal, web: Keypal, owner: str) -> None:
    created = admin.create(owner, scopes=["read"], rate_limit={"requests": 100, "window": "1m"})
    assert admin.disable(created.id) is True
    assert web.verify(created.key).error_code == "DISABLED"
    assert admin.enable(created.id) is True
    assert web.verify(created.key).valid

    updated = admin.update(created.id, name="renamed", tags=["prod"], rate_limit=None)
    assert updated.name == "renamed" and updated.tags == ["prod"]
    assert updated.rate_limit is None, "None clears a JSON setting"
    assert updated.scopes == ["read"], "what is not given is kept"

    rotated = admin.rotate(created.id, grace="1h", name="next")
    assert rotated.old_id == created.id
    assert web.verify(rotated.key).valid and web.verify(created.key).valid
    child = admin.create(owner, parent_id=rotated.id, scopes=["read"])
    assert admin.revoke(rotated.id, reason="leaked") == 1
    assert web.verify(child.key).error_code == "REVOKED", "the cascade revoked the child in the same transaction"
    assert admin.get(rotated.id).revoke_reason == "leaked"
    assert admin.revoke_many([rotated.id, child.id]) == 0


def test_usage(admin: Keypal, web: Keypal, owner: str) -> None:
    created = admin.create(owner, quota={"limit": 5, "period": "day"})
    web.verify(created.key, cost=2)
    u = admin.usage(created.id)
    assert (u.used, u.limit, u.remaining, u.period) == (2, 5, 3, "day")
    assert isinstance(u.resets_at, datetime) and isinstance(u.cost, Decimal)


def test_not_found(admin: Keypal) -> None:
    with pytest.raises(KeypalNotFoundError) as e:
        admin.get("00000000-0000-0000-0000-000000000001")
    assert isinstance(e.value, KeypalError)
    assert (e.value.sqlstate, e.value.code) == ("P0002", "KEY_NOT_FOUND")


def test_bad_argument_writes_nothing(admin: Keypal, owner: str) -> None:
    with pytest.raises(KeypalInvalidArgumentError) as e:
        admin.create(owner, expires_in="soon")
    assert e.value.sqlstate == "22007" and "expires_in" in str(e.value)
    with pytest.raises(KeypalInvalidArgumentError):
        admin.create_many([{"owner_id": owner}, {"owner_id": owner, "expires_in": "soon"}])
    assert admin.list(owner_id=owner, include_revoked=True) == []


def test_revoked_cannot_change(admin: Keypal, owner: str) -> None:
    key_id = admin.create(owner).id
    admin.revoke(key_id)
    with pytest.raises(KeypalStateError) as e:
        admin.update(key_id, name="x")
    assert (e.value.sqlstate, e.value.code) == ("55000", "CANNOT_MODIFY_REVOKED")


def test_verify_role_cannot_manage(web: Keypal, owner: str) -> None:
    with pytest.raises(KeypalForbiddenError) as e:
        web.create(owner)
    assert e.value.code == "42501"


def test_unknown_option(admin: Keypal, owner: str) -> None:
    with pytest.raises(TypeError):
        admin.create(owner, colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        admin.verify("x", scpe="read")  # type: ignore[call-arg]


def test_plain_ip() -> None:
    assert plain_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert plain_ip("::1") == "::1"
    assert plain_ip(None) is None
    assert plain_ip("testclient") is None and plain_ip("/run/app.sock") is None and plain_ip("10.0.0.1, 10.0.0.2") is None


def test_async_client(admin: Keypal, owner: str) -> None:
    async def run() -> None:
        keys = await AsyncKeypal(conninfo("keypal_web"), min_size=1, max_size=2).open()
        try:
            key = admin.create(owner, scopes=["read"]).key
            assert (await keys.verify(key, scope="read")).valid
            assert (await keys.verify(key, scope="write")).error_code == "INSUFFICIENT_SCOPE"
            with pytest.raises(KeypalForbiddenError):
                await keys.create(owner)
        finally:
            await keys.close()

    asyncio.run(run())


def test_columns_a_later_keypal_adds_are_left_out(admin: Keypal, owner: str) -> None:
    from psycopg import sql

    from keypal_pg._sql import Call
    from keypal_pg.types import Usage

    key_id = admin.create(owner).id
    query = sql.SQL("SELECT *, 42 AS added_later FROM keypal_usage(%s)")
    [usage] = admin._rows(Call(query, [key_id]), Usage)
    assert usage.used == 0 and not hasattr(usage, "added_later")
