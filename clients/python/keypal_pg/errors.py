"""Errors raised by keypal's SQL functions, as typed exceptions.

The class follows the SQLSTATE (SPEC §5); ``code`` is keypal's machine code from the error's
DETAIL when it has one (``KEY_NOT_FOUND``, ``CANNOT_MODIFY_REVOKED``, ``INSUFFICIENT_SCOPE``…).
"""

from __future__ import annotations

import re

import psycopg


class KeypalError(Exception):
    def __init__(self, message: str, sqlstate: str, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail
        self.hint = hint
        self.code = detail if detail and re.fullmatch(r"[A-Z][A-Z_]+", detail) else sqlstate


class KeypalNotFoundError(KeypalError):
    """P0002: no key (or webhook, event) with that id."""


class KeypalInvalidArgumentError(KeypalError):
    """22xxx/23xxx: a bad argument, named in the message; nothing was written."""


class KeypalStateError(KeypalError):
    """55000: the key's state forbids the change (e.g. CANNOT_MODIFY_REVOKED)."""


class KeypalUnauthorizedError(KeypalError):
    """28000: keypal_require/keypal_authenticate refused the key itself."""


class KeypalForbiddenError(KeypalError):
    """42501: a scope, environment, ip or region rule refused, or the role lacks a privilege."""


class KeypalLimitError(KeypalError):
    """53400: over a rate limit or quota."""

    @property
    def retry_after_ms(self) -> int | None:
        m = re.search(r"(\d+)\s*ms", self.hint or "")
        return int(m.group(1)) if m else None


def _class_for(sqlstate: str) -> type[KeypalError]:
    exact: dict[str, type[KeypalError]] = {
        "P0002": KeypalNotFoundError,
        "55000": KeypalStateError,
        "28000": KeypalUnauthorizedError,
        "42501": KeypalForbiddenError,
        "53400": KeypalLimitError,
    }
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate[:2] in ("22", "23"):
        return KeypalInvalidArgumentError
    return KeypalError


def translate(err: psycopg.Error) -> Exception:
    """A database error becomes the matching KeypalError; a lost connection is kept as it is."""
    state = err.sqlstate
    if not state:
        return err
    diag = err.diag
    return _class_for(state)(diag.message_primary or str(err), state, diag.message_detail, diag.message_hint)
