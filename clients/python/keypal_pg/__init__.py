"""keypal-pg: a thin client for the keypal PostgreSQL extension.

Each method is one SQL function call with bind parameters; every rule runs in the database.
Web helpers: ``keypal_pg.fastapi.require_key``, ``keypal_pg.asgi.KeypalMiddleware``,
``keypal_pg.wsgi.KeypalWSGIMiddleware``.
"""

from .client import AsyncKeypal, Keypal
from .errors import (KeypalError, KeypalForbiddenError, KeypalInvalidArgumentError, KeypalLimitError,
                     KeypalNotFoundError, KeypalStateError, KeypalUnauthorizedError)  # fmt: skip
from .http import Denial, Guard, denial, key_headers, plain_ip
from .types import (ApiKeyRecord, CreatedKey, CreateOptions, CreateSpec, ErrorCode, ListOptions, RotatedKey, RotateOptions,
                    UpdateOptions, Usage, VerifyOptions, VerifyResult)  # fmt: skip

__all__ = [
    "AsyncKeypal", "Keypal", "KeypalError", "KeypalForbiddenError", "KeypalInvalidArgumentError", "KeypalLimitError",
    "KeypalNotFoundError", "KeypalStateError", "KeypalUnauthorizedError", "Denial", "Guard", "denial", "key_headers",
    "plain_ip", "ApiKeyRecord", "CreatedKey", "CreateOptions", "ErrorCode", "ListOptions", "RotatedKey",
    "RotateOptions", "CreateSpec", "UpdateOptions", "Usage", "VerifyOptions", "VerifyResult",
]  # fmt: skip
