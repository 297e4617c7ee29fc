"""Connections to the test database (clients/setup.sql) and real servers on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import uvicorn
from psycopg_pool import ConnectionPool

from keypal_pg import Keypal


def conninfo(user: str) -> str:
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    return f"host={host} port={port} dbname={os.environ.get('KEYPAL_DB', 'keypal_clients')} user={user}"


def sync_client(user: str) -> Keypal:
    return Keypal(ConnectionPool(conninfo(user), min_size=1, max_size=4, open=True))


@pytest.fixture(scope="session")
def admin() -> Iterator[Keypal]:
    """The manager role: granted the management functions."""
    keys = sync_client("keypal_manager")
    yield keys
    keys.pool.close()


@pytest.fixture(scope="session")
def web() -> Iterator[Keypal]:
    """The web role: PUBLIC's verify rights only."""
    keys = sync_client("keypal_web")
    yield keys
    keys.pool.close()


@pytest.fixture
def owner() -> str:
    return f"py_{uuid.uuid4().hex[:12]}"


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
