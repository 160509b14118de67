"""What stages need of a database handle: the part of asyncpg's Pool/Connection they call.

Stages take it injected, so a test can hand them a real pool, a connection or a fake.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class Database(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: Any) -> Any: ...

    async def execute(self, query: str, *args: Any) -> str: ...


class Transactional(Database, Protocol):
    """A database handle that can also open a transaction (a pool, in the pipeline)."""

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        """A connection inside a transaction, committed when the block ends without error."""
        ...
