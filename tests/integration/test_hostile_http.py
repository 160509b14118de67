"""The hostile HTTP corpus against a running ingest API: each request gets its status, the
server stays up, and the good request sent after each one is accepted and stored."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp

from pipeline import tokens
from pipeline.devstack import free_port
from tests.conftest import eventually
from tests.corpus.hostile_http import HOSTILE_HTTP, ITEM, ORG_UNIT, OTHER_UNIT, PATH, HostileRequest
from tests.integration.support import running

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
OTHER = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
BASE = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)


async def send_raw(port: int, request: HostileRequest, token: str) -> int | None:
    """Send the request as bytes; the status of the answer, None if the server just closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = request.head.replace("{token}", token)
        body = request.body if request.stall_after is None else request.body[: request.stall_after]
        writer.write(head.encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
    except (ConnectionError, TimeoutError):
        return None
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 else None


def test_the_http_corpus_holds_at_least_20_requests() -> None:
    assert len(HOSTILE_HTTP) >= 20
    assert len({r.name for r in HOSTILE_HTTP}) == len(HOSTILE_HTTP)


async def test_every_hostile_request_gets_its_status_and_the_next_good_one_is_stored(
    settings, db
) -> None:
    await db.executemany(
        "INSERT INTO einheit VALUES ($1, $2)", [(ORG_UNIT, ORG), (OTHER_UNIT, OTHER)]
    )
    token = await tokens.create(db, ORG, "corpus")
    port = free_port()
    api = settings.model_copy(
        update={"api_port": port, "http_host": "127.0.0.1", "api_body_timeout_seconds": 1.0}
    )
    statuses: dict[str, int | None] = {}
    async with running(api), aiohttp.ClientSession() as session:
        for index, request in enumerate(HOSTILE_HTTP):
            statuses[request.name] = await send_raw(port, request, token)
            item = {**ITEM, "timestamp": (BASE + timedelta(seconds=index)).isoformat()}
            async with session.post(
                f"http://127.0.0.1:{port}{PATH}",
                data=json.dumps(item),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 202, (request.name, await resp.text())
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM zaehler_rohdaten"),
            lambda n: n == len(HOSTILE_HTTP),
        )
    assert statuses == {r.name: r.status for r in HOSTILE_HTTP}
