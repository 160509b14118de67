"""Who owns a unit or a device: the `einheit` and `bess_device` tables, cached.

A key not in the cache is looked up at once (and a miss remembered for `miss_ttl_s`), so a
unit or device inserted while the pipeline runs is recognised within that time; the whole
table is re-read every `refresh_s` to notice one that moved to another organization.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any
from uuid import UUID

from stages.db import Database

#: Misses remembered at most; a flood of made-up ids must not grow memory.
MAX_MISSES = 100_000


class OwnerCache:
    """Organization per key, from a table whose key columns come first in `all_sql`."""

    def __init__(
        self,
        pool: Database,
        all_sql: str,
        one_sql: str,
        *,
        refresh_s: float = 30.0,
        miss_ttl_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self._all_sql = all_sql
        self._one_sql = one_sql
        self._refresh_s = refresh_s
        self._miss_ttl_s = miss_ttl_s
        self._owners: dict[Hashable, UUID] = {}
        self._misses: dict[Hashable, float] = {}
        self._loaded_at = float("-inf")

    async def owner(self, *key: Any) -> UUID | None:
        now = time.monotonic()
        if now - self._loaded_at > self._refresh_s:
            rows = await self._pool.fetch(self._all_sql)
            self._owners = {tuple(row)[:-1]: row["organization_id"] for row in rows}
            self._misses.clear()
            self._loaded_at = now
        org = self._owners.get(key)
        if org is not None:
            return org
        missed_at = self._misses.get(key)
        if missed_at is not None and now - missed_at < self._miss_ttl_s:
            return None
        row = await self._pool.fetchrow(self._one_sql, *key)
        if row is None:
            if len(self._misses) > MAX_MISSES:
                self._misses.clear()
            self._misses[key] = now
            return None
        self._owners[key] = row["organization_id"]
        return row["organization_id"]  # type: ignore[no-any-return]


class EinheitCache(OwnerCache):
    """Units (`einheit`) and their organizations."""

    def __init__(self, pool: Database, **timing: float) -> None:
        super().__init__(
            pool,
            "SELECT id, organization_id FROM einheit",
            "SELECT organization_id FROM einheit WHERE id = $1",
            **timing,
        )

    async def organization_of(self, einheit_id: int) -> UUID | None:
        return await self.owner(einheit_id)


class DeviceCache(OwnerCache):
    """BESS devices (`bess_device`, registered by the operator) and their organizations."""

    def __init__(self, pool: Database, **timing: float) -> None:
        super().__init__(
            pool,
            "SELECT site, device, organization_id FROM bess_device",
            "SELECT organization_id FROM bess_device WHERE site = $1 AND device = $2",
            **timing,
        )

    async def organization_of(self, site: str, device: str) -> UUID | None:
        return await self.owner(site, device)
