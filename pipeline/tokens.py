"""API tokens (design §12): made by `pipeline token create`, one organization each, stored only
as their SHA-256, looked up by the ingest API.

A token is 32 random bytes (`secrets.token_urlsafe`), printed once. The API keeps the table in
memory and reads it again every `refresh_s` (2 s), so a created or revoked token takes effect
within that; an unknown token is also looked up at once, at most once a second per token, so
a new token works on its first request. `last_used_at` is written in the background, a few
seconds late, instead of once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog

from stages.db import Database

log = structlog.get_logger("pipeline.tokens")

TOKEN_BYTES = 32
MAX_MISSES = 10_000


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    name: str
    organization_id: UUID
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


async def create(db: Database, organization_id: UUID, name: str) -> str:
    """A new token for `organization_id`; returns it, the only time it is seen."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    await db.execute(
        "INSERT INTO api_token (name, organization_id, token_sha256) VALUES ($1, $2, $3)",
        name,
        organization_id,
        digest(token),
    )
    return token


async def listing(db: Database) -> list[TokenInfo]:
    rows = await db.fetch(
        "SELECT name, organization_id, created_at, last_used_at, revoked_at FROM api_token "
        "ORDER BY name"
    )
    return [TokenInfo(**dict(row)) for row in rows]


async def revoke(db: Database, name: str) -> bool:
    """Revoke the token `name`; False if there is none (or it was revoked already)."""
    status = await db.execute(
        "UPDATE api_token SET revoked_at = NOW() WHERE name = $1 AND revoked_at IS NULL", name
    )
    return status.endswith(" 1")


class TokenCache:
    """Which organization a presented token belongs to, if any."""

    def __init__(self, db: Database, *, refresh_s: float = 2.0, miss_ttl_s: float = 1.0) -> None:
        self._db = db
        self._refresh_s = refresh_s
        self._miss_ttl_s = miss_ttl_s
        self._by_digest: dict[str, tuple[str, UUID]] = {}
        self._misses: dict[str, float] = {}
        self._loaded_at = float("-inf")
        self._used: dict[str, datetime] = {}

    async def organization_of(self, token: str) -> UUID | None:
        presented = digest(token)
        now = time.monotonic()
        if now - self._loaded_at > self._refresh_s:
            await self._load(now)
        found = self._match(presented)
        if found is None and now - self._misses.get(presented, float("-inf")) > self._miss_ttl_s:
            await self._load(now)
            found = self._match(presented)
            if found is None:
                if len(self._misses) > MAX_MISSES:
                    self._misses.clear()
                self._misses[presented] = now
        if found is None:
            return None
        name, org = found
        self._used[name] = datetime.now(UTC)
        return org

    def _match(self, presented: str) -> tuple[str, UUID] | None:
        """The active token with this digest, compared with every one in constant time, so
        how long an answer takes says nothing about how close a guess came."""
        found = None
        for stored, owner in self._by_digest.items():
            if hmac.compare_digest(stored, presented):
                found = owner
        return found

    async def _load(self, now: float) -> None:
        rows = await self._db.fetch(
            "SELECT name, organization_id, token_sha256 FROM api_token WHERE revoked_at IS NULL"
        )
        self._by_digest = {r["token_sha256"]: (r["name"], r["organization_id"]) for r in rows}
        self._loaded_at = now

    async def record_use(self, stop: asyncio.Event, every_s: float = 2.0) -> None:
        """Write `last_used_at` of the tokens used since the last round, until `stop`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            used, self._used = self._used, {}
            if not used:
                continue
            try:
                await self._db.execute(
                    "UPDATE api_token t SET last_used_at = u.at FROM unnest($1::text[], "
                    "$2::timestamptz[]) AS u(name, at) WHERE t.name = u.name",
                    list(used),
                    list(used.values()),
                )
            except Exception as exc:  # the database away: try again with the next round
                log.warning("last_used_at not written", error=repr(exc))
                self._used = {**used, **self._used}


def describe(info: TokenInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "organization": str(info.organization_id),
        "created": info.created_at.isoformat(),
        "last_used": info.last_used_at.isoformat() if info.last_used_at else None,
        "revoked": info.revoked_at.isoformat() if info.revoked_at else None,
    }
