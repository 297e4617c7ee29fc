"""The README's FastAPI example, run exactly as written (uvicorn in its own process), against
the test database as the verify-only role."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from keypal_pg import Keypal

README = Path(__file__).resolve().parents[3] / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readme_fastapi_example(admin: Keypal, tmp_path: Path) -> None:
    section = README.read_text().split("## From Node.js and Python")[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README has the FastAPI example"
    example = found.group(1)
    assert len(example.strip().splitlines()) <= 12, "ten lines of code, two blank"
    (tmp_path / "app.py").write_text(example)
    port = free_port()
    db = os.environ.get("KEYPAL_DB", "keypal_clients")
    env = {**os.environ, "DATABASE_URL": f"postgresql://keypal_web@127.0.0.1:{os.environ['PGPORT']}/{db}"}
    cmd = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(tmp_path), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{port}/api/me"
        for attempt in range(200):
            try:
                httpx.get(url)
                break
            except httpx.TransportError:
                assert server.poll() is None, "uvicorn exited"
                time.sleep(0.05)
        key = admin.create("readme_owner", scopes=["read"]).key
        write_only = admin.create("readme_owner", scopes=["write"]).key
        ok = httpx.get(url, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json() == {"owner": "readme_owner"}
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"x-api-key": write_only}).status_code == 403
    finally:
        server.terminate()
        server.wait(10)
