#!/usr/bin/env python3
"""keypal request signing, client side: the same signature keypal_sign makes.

    python3 sign.py SIGNING_SECRET METHOD PATH BODY   ->  prints the Keypal-Signature value
"""
import hashlib
import hmac
import sys
import time


def keypal_signature(secret: str, method: str, path: str, body: bytes, t: int | None = None) -> str:
    t = int(time.time()) if t is None else t
    canonical = f"{method.upper()}\n{path}\n{t}\n{hashlib.sha256(body).hexdigest()}"
    v1 = hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={v1}"


if __name__ == "__main__":
    secret, method, path, body = sys.argv[1:5]
    print(keypal_signature(secret, method, path, body.encode()))
