"""The client: each method is one SQL function call with bind parameters; every rule (hashing,
scopes, limits, audit) runs in the database. ``Keypal`` is blocking, ``AsyncKeypal`` asyncio."""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from dataclasses import fields
from typing import Any, AsyncIterator, Iterator, Mapping, NoReturn, TypeVar, Unpack

import psycopg
from psycopg import sql
from psycopg.rows import BaseRowFactory, kwargs_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import _sql
from ._sql import Call
from .errors import translate
from .http import Headers, key_headers, plain_ip
from .types import (ApiKeyRecord, CreatedKey, CreateOptions, CreateSpec, Id, ListOptions, RotatedKey, RotateOptions,
                    UpdateOptions, Usage, VerifyOptions, VerifyResult)  # fmt: skip

T = TypeVar("T")


def _rows_of(cls: type[T]) -> BaseRowFactory[T]:
    """Rows as ``cls``, from the columns it names: a column a later keypal adds is left out."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]

    def make(**row: Any) -> T:
        return cls(**{k: v for k, v in row.items() if k in names})

    return kwargs_row(make)


def _raise(err: psycopg.Error) -> NoReturn:
    translated = translate(err)
    if translated is err:
        raise err
    raise translated from err


class _Calls:
    """The SQL for each operation; shared by the blocking and the asyncio client."""

    def __init__(self, schema: str | None):
        self.schema = schema

    def _fn(self, name: str) -> sql.Composable:
        return sql.Identifier(self.schema, name) if self.schema else sql.Identifier(name)

    def _call(self, fn: str, first: list[tuple[str, str, Any]], table: Mapping[str, str] = {},
              options: Mapping[str, Any] = {}) -> Call:  # fmt: skip
        return _sql.call(self.schema, fn, first, table, options)

    def _verify(self, key: str | Headers | None, o: VerifyOptions) -> Call:
        # One fixed text per function, so psycopg prepares it after a few uses.
        rest = [o.get("scope"), o.get("scopes"), o.get("resource"), plain_ip(o.get("ip")), o.get("country"),
                o.get("env"), o.get("cost")]  # fmt: skip
        unknown = set(o) - set(_sql.VERIFY)
        if unknown:
            raise TypeError(f"keypal: unknown option {sorted(unknown)[0]} for keypal_verify")
        tail = sql.SQL("%s, %s::text[], %s, %s::inet, %s, %s, %s::integer")
        if key is not None and not isinstance(key, str):
            q = sql.SQL("SELECT * FROM {}(%s::jsonb, {})").format(self._fn("keypal_verify_headers"), tail)
            return Call(q, [_sql.jsonb(key_headers(key)), *rest])
        q = sql.SQL("SELECT * FROM {}(%s::text, {})").format(self._fn("keypal_verify"), tail)
        return Call(q, [key, *rest])

    def _verify_many(self, keys: list[str], o: VerifyOptions) -> Call:
        return self._call("keypal_verify_many", [("keys", "text[]", keys)], _sql.VERIFY, {**o, "ip": plain_ip(o.get("ip"))})

    def _create_many(self, specs: list[CreateSpec]) -> Call:
        for spec in specs:
            unknown = set(spec) - set(_sql.CREATE)
            if unknown:
                raise TypeError(f"keypal: unknown option {sorted(unknown)[0]} for keypal_create_many")
        return self._call("keypal_create_many", [("specs", "jsonb", [dict(s) for s in specs])])

    def _by_id(self, fn: str, id: Id, table: Mapping[str, str] = {}, options: Mapping[str, Any] = {}) -> Call:
        return self._call(fn, [("id", "uuid", id)], table, options)


class Keypal(_Calls):
    """Blocking client. ``Keypal(pool)`` with a psycopg_pool.ConnectionPool of yours, or
    ``Keypal("postgresql://…")`` for a pool it owns (close it with ``close()``)."""

    def __init__(self, pool: ConnectionPool | str, *, schema: str | None = None, **pool_args: Any):
        super().__init__(schema)
        self._owned = isinstance(pool, str)
        self.pool = ConnectionPool(pool, open=True, **pool_args) if isinstance(pool, str) else pool

    @contextmanager
    def _cursor(self, cls: type[T]) -> Iterator[psycopg.Cursor[T]]:
        try:
            with self.pool.connection() as conn, conn.cursor(row_factory=_rows_of(cls)) as cur:
                yield cur
        except psycopg.Error as err:
            _raise(err)

    def _rows(self, c: Call, cls: type[T]) -> list[T]:
        with self._cursor(cls) as cur:
            cur.execute(c.query, c.params)
            return cur.fetchall()

    def _one(self, c: Call, cls: type[T]) -> T:
        return self._rows(c, cls)[0]

    def _scalar(self, c: Call) -> Any:
        try:
            with self.pool.connection() as conn:
                row = conn.execute(c.query, c.params).fetchone()
        except psycopg.Error as err:
            _raise(err)
        return row[0] if row else None

    def create(self, owner_id: str, **options: Unpack[CreateOptions]) -> CreatedKey:
        return self._one(self._call("keypal_create", [("owner_id", "text", owner_id)], _sql.CREATE, options), CreatedKey)

    def create_many(self, specs: list[CreateSpec]) -> list[CreatedKey]:
        """All in one transaction: every key is created, or none."""
        return self._rows(self._create_many(specs), CreatedKey)

    def verify(self, key: str | Headers | None, **options: Unpack[VerifyOptions]) -> VerifyResult:
        """Verifies a key, or the key in request headers. Never raises for a bad key."""
        return self._one(self._verify(key, options), VerifyResult)

    def verify_many(self, keys: list[str], **options: Unpack[VerifyOptions]) -> list[VerifyResult]:
        return self._rows(self._verify_many(keys, options), VerifyResult)

    def revoke(self, id: Id, *, reason: str | None = None, actor: str | None = None) -> int:
        """Revokes the key and, in the same transaction (by trigger), its descendants; returns 1, or 0
        if it was already revoked (descendants are not counted)."""
        return int(self._scalar(self._by_id("keypal_revoke", id, _sql.REVOKE, {"reason": reason, "actor": actor})))

    def revoke_many(self, ids: list[Id], *, reason: str | None = None, actor: str | None = None) -> int:
        c = self._call("keypal_revoke_many", [("ids", "uuid[]", ids)], _sql.REVOKE, {"reason": reason, "actor": actor})
        return int(self._scalar(c))

    def rotate(self, id: Id, **options: Unpack[RotateOptions]) -> RotatedKey:
        return self._one(self._by_id("keypal_rotate", id, _sql.ROTATE, options), RotatedKey)

    def enable(self, id: Id, *, actor: str | None = None) -> bool:
        return bool(self._scalar(self._by_id("keypal_enable", id, _sql.ACTOR, {"actor": actor})))

    def disable(self, id: Id, *, actor: str | None = None) -> bool:
        return bool(self._scalar(self._by_id("keypal_disable", id, _sql.ACTOR, {"actor": actor})))

    def update(self, id: Id, **changes: Unpack[UpdateOptions]) -> ApiKeyRecord:
        """Changes only what is given; ``rate_limit=None`` / ``quota=None`` clear them."""
        return self._one(self._by_id("keypal_update", id, _sql.UPDATE, changes), ApiKeyRecord)

    def get(self, id: Id) -> ApiKeyRecord:
        return self._one(self._by_id("keypal_get", id), ApiKeyRecord)

    def list(self, **options: Unpack[ListOptions]) -> list[ApiKeyRecord]:
        return self._rows(self._call("keypal_list", [], _sql.LIST, options), ApiKeyRecord)

    def usage(self, id: Id) -> Usage:
        return self._one(self._call("keypal_usage", [("key_id", "uuid", id)]), Usage)

    def close(self) -> None:
        if self._owned:
            self.pool.close()


class AsyncKeypal(_Calls):
    """asyncio client, the same methods as ``Keypal`` (each awaited)."""

    def __init__(self, pool: AsyncConnectionPool | str, *, schema: str | None = None, **pool_args: Any):
        super().__init__(schema)
        self._owned = isinstance(pool, str)
        self.pool = AsyncConnectionPool(pool, open=False, **pool_args) if isinstance(pool, str) else pool

    async def open(self) -> AsyncKeypal:
        """Opens the pool keypal-pg owns (asyncio pools open inside the event loop)."""
        if self._owned:
            await self.pool.open()
        return self

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        """``FastAPI(lifespan=keys.lifespan)``: the pool is open while the app runs."""
        await self.open()
        try:
            yield
        finally:
            await self.close()

    @asynccontextmanager
    async def _cursor(self, cls: type[T]) -> AsyncIterator[psycopg.AsyncCursor[T]]:
        try:
            async with self.pool.connection() as conn, conn.cursor(row_factory=_rows_of(cls)) as cur:
                yield cur
        except psycopg.Error as err:
            _raise(err)

    async def _rows(self, c: Call, cls: type[T]) -> list[T]:
        async with self._cursor(cls) as cur:
            await cur.execute(c.query, c.params)
            return await cur.fetchall()

    async def _one(self, c: Call, cls: type[T]) -> T:
        return (await self._rows(c, cls))[0]

    async def _scalar(self, c: Call) -> Any:
        try:
            async with self.pool.connection() as conn:
                row = await (await conn.execute(c.query, c.params)).fetchone()
        except psycopg.Error as err:
            _raise(err)
        return row[0] if row else None

    async def create(self, owner_id: str, **options: Unpack[CreateOptions]) -> CreatedKey:
        return await self._one(self._call("keypal_create", [("owner_id", "text", owner_id)], _sql.CREATE, options), CreatedKey)

    async def create_many(self, specs: list[CreateSpec]) -> list[CreatedKey]:
        return await self._rows(self._create_many(specs), CreatedKey)

    async def verify(self, key: str | Headers | None, **options: Unpack[VerifyOptions]) -> VerifyResult:
        return await self._one(self._verify(key, options), VerifyResult)

    async def verify_many(self, keys: list[str], **options: Unpack[VerifyOptions]) -> list[VerifyResult]:
        return await self._rows(self._verify_many(keys, options), VerifyResult)

    async def revoke(self, id: Id, *, reason: str | None = None, actor: str | None = None) -> int:
        return int(await self._scalar(self._by_id("keypal_revoke", id, _sql.REVOKE, {"reason": reason, "actor": actor})))

    async def revoke_many(self, ids: list[Id], *, reason: str | None = None, actor: str | None = None) -> int:
        c = self._call("keypal_revoke_many", [("ids", "uuid[]", ids)], _sql.REVOKE, {"reason": reason, "actor": actor})
        return int(await self._scalar(c))

    async def rotate(self, id: Id, **options: Unpack[RotateOptions]) -> RotatedKey:
        return await self._one(self._by_id("keypal_rotate", id, _sql.ROTATE, options), RotatedKey)

    async def enable(self, id: Id, *, actor: str | None = None) -> bool:
        return bool(await self._scalar(self._by_id("keypal_enable", id, _sql.ACTOR, {"actor": actor})))

    async def disable(self, id: Id, *, actor: str | None = None) -> bool:
        return bool(await self._scalar(self._by_id("keypal_disable", id, _sql.ACTOR, {"actor": actor})))

    async def update(self, id: Id, **changes: Unpack[UpdateOptions]) -> ApiKeyRecord:
        return await self._one(self._by_id("keypal_update", id, _sql.UPDATE, changes), ApiKeyRecord)

    async def get(self, id: Id) -> ApiKeyRecord:
        return await self._one(self._by_id("keypal_get", id), ApiKeyRecord)

    async def list(self, **options: Unpack[ListOptions]) -> list[ApiKeyRecord]:
        return await self._rows(self._call("keypal_list", [], _sql.LIST, options), ApiKeyRecord)

    async def usage(self, id: Id) -> Usage:
        return await self._one(self._call("keypal_usage", [("key_id", "uuid", id)]), Usage)

    async def close(self) -> None:
        if self._owned:
            await self.pool.close()
