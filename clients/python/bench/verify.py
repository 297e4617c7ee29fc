"""The baseline for the client bench: AsyncKeypal.verify(KEY, scope="read") straight from the
client (pool of POOL), CONCURRENCY tasks for SECONDS; every result must be valid. Prints verifies/s.
   python verify.py KEY SECONDS CONCURRENCY"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from keypal_pg import AsyncKeypal


async def main(key: str, seconds: float, concurrency: int) -> None:
    pool = int(os.environ.get("POOL", "4"))
    keys = await AsyncKeypal(os.environ["DATABASE_URL"], min_size=pool, max_size=pool).open()
    await keys.verify(key, scope="read")
    until = time.monotonic() + seconds
    n = 0

    async def loop() -> None:
        nonlocal n
        while time.monotonic() < until:
            r = await keys.verify(key, scope="read")
            if not r.valid:
                raise RuntimeError(r.error_code)
            n += 1

    start = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    print(round(n / (time.monotonic() - start)))
    await keys.close()


asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
