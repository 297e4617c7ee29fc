"""Apps for the client bench, GET /api/data behind keypal (scope "read"); DATABASE_URL, pool of POOL.
   uvicorn app:fastapi_app   (the require_key dependency)
   uvicorn app:asgi_app      (the ASGI middleware around a bare ASGI app)
   uvicorn app:plain_app     (the same FastAPI route with no key: the framework's own ceiling)"""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import Depends, FastAPI

from keypal_pg import AsyncKeypal, VerifyResult
from keypal_pg.asgi import KeypalMiddleware
from keypal_pg.fastapi import require_key

POOL = int(os.environ.get("POOL", "4"))
keys = AsyncKeypal(os.environ["DATABASE_URL"], min_size=POOL, max_size=POOL)
fastapi_app = FastAPI(lifespan=keys.lifespan)


@fastapi_app.get("/api/data")
async def data(key: VerifyResult = Depends(require_key(keys, scope="read"))) -> dict[str, Any]:
    return {"owner": key.owner_id}


plain_app = FastAPI()


@plain_app.get("/api/data")
async def plain_data() -> dict[str, Any]:
    return {"owner": "plain"}


async def _bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await keys.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await keys.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps({"owner": scope["state"]["keypal"].owner_id}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


asgi_app = KeypalMiddleware(_bare, keys, scope="read")
