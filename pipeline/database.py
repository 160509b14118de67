"""The asyncpg pool as the stages see it: every call bounded in time.

asyncpg's `Pool.fetch` and friends wait for a free connection without a limit, and a
connection attempt to an unreachable host waits 60 s by default. A worker whose database is
away must notice within seconds, retry with backoff and say so on `/health`, not hang; this
wrapper puts a timeout on acquiring a connection and on every statement.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg


class TimedPool:
    """`stages.db.Database` over an asyncpg pool, with acquire and statement timeouts."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_s: float, statement_s: float) -> None:
        self.pool = pool
        self._acquire_s = acquire_s
        self._statement_s = statement_s

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire(timeout=self._acquire_s) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.acquire() as conn, conn.transaction():
            yield conn

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args, timeout=self._statement_s)  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, timeout=self._statement_s)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, timeout=self._statement_s)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return await conn.execute(query, *args, timeout=self._statement_s)  # type: ignore[no-any-return]

    async def close(self, timeout_s: float = 3.0) -> None:
        """Close gracefully; a connection stuck on an unreachable server is cut off."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout_s)
        except (TimeoutError, OSError, asyncpg.InterfaceError):
            self.pool.terminate()


async def connect(
    dsn: str,
    *,
    size: int,
    connect_s: float,
    acquire_s: float,
    statement_s: float,
) -> TimedPool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=0,  # no background reconnects (and their log noise) while the database is away
        max_size=size,
        timeout=connect_s,
        command_timeout=statement_s,
    )
    return TimedPool(pool, acquire_s=acquire_s, statement_s=statement_s)
