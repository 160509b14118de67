"""Stage `http_ingest`: the HTTP ingest API of design §12 on `PIPELINE_API_PORT`.

aiohttp, the framework the operations port already runs in the same event loop (see "HTTP
ingest API" in the README for why not FastAPI). Each request: the token (401), the content type
(415), the size (413), the body's shape (400); then every item alone, at once, through the
validate stage functions; accepted items go to their `ingest.…` subject, refused ones to
`dlq.{reason}`, and the answer (202, or 422/403 when nothing was accepted) goes out only once
JetStream has stored all of it — HTTP's PUBACK. When JetStream (or the database, for tokens and
units) cannot answer in time: 503 with `Retry-After`, and a retry doubles nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog
from aiohttp import web

from pipeline.codec import encode
from pipeline.health import Health
from pipeline.http import serve
from pipeline.metrics import Metrics
from pipeline.runner import count_reject
from pipeline.tokens import TokenCache
from schemas.api import LAST_COLUMNS
from schemas.bess import NAME_PATTERN
from schemas.messages import IngestMessage, Reject
from stages.db import Database
from stages.http_ingest import (
    ADDRESSES,
    BodyRefused,
    Verdict,
    items_of,
    rejected,
    to_ingest,
)
from stages.mqtt_bridge import ingest_subject
from stages.validate import Refused

__all__ = ["IngestApi", "serve"]

log = structlog.get_logger("pipeline.api")

#: How long JetStream may take to store what a request brought.
STORE_TIMEOUT_S = 5.0
RETRY_AFTER_S = "2"
JSON_TYPES = ("application/json",)
Judge = Callable[[IngestMessage], Awaitable[list[Any]]]


class Unavailable(Exception):
    """JetStream or the database cannot take or answer this request now (503)."""


class IngestApi:
    """The handlers; `judges` maps each ingest path to its kind's validate stage function."""

    def __init__(
        self,
        *,
        js: Any,
        db: Database,
        tokens: TokenCache,
        judges: Mapping[str, Judge],
        health: Health,
        metrics: Metrics,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
    ) -> None:
        self._body_timeout_s = body_timeout_s
        self._js = js
        self._db = db
        self._tokens = tokens
        self._judges = judges
        self._health = health
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._observe], client_max_size=self._max_body_bytes)
        for path in ADDRESSES:
            app.router.add_post(path, self._ingest)
        app.router.add_get("/api/last", self._last)
        app.router.add_get("/healthz", self._healthz)
        return app

    @web.middleware
    async def _observe(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "other"
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, …
            response = _error(exc.status, exc.reason)
            if exc.status == 405:
                response.headers["Allow"] = exc.headers.get("Allow", "")
        except Unavailable as exc:
            log.warning("ingest API unavailable", path=path, error=str(exc))
            response = _error(503, "storage is not available right now, retry")
            response.headers["Retry-After"] = RETRY_AFTER_S
        m = self._metrics
        m.api_requests.labels(path, str(response.status)).inc()
        m.api_request_seconds.observe(time.perf_counter() - started)
        return response

    async def _organization(self, request: web.Request) -> UUID | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            return await self._tokens.organization_of(token.strip())
        except Exception as exc:
            raise Unavailable(f"tokens: {exc!r}") from exc

    async def _ingest(self, request: web.Request) -> web.Response:
        path = request.path
        org = await self._organization(request)
        if org is None:
            return _unauthorized()
        if request.content_type not in JSON_TYPES and not request.content_type.endswith("+json"):
            return _error(415, f"content type {request.content_type!r}; send application/json")
        if (request.content_length or 0) > self._max_body_bytes:
            return _too_large(self._max_body_bytes)
        body = await self._body(request)
        if body is None:
            return _too_large(self._max_body_bytes)
        try:
            items = items_of(body)
        except BodyRefused as refused:
            return _error(400, str(refused))
        verdict, outbound = await self._judge(path, org, items)
        await self._store(outbound)
        m = self._metrics
        m.api_items.labels(path, "accepted").inc(verdict.accepted)
        m.api_items.labels(path, "rejected").inc(len(verdict.rejected))
        return web.json_response(verdict.body(), status=verdict.status)

    async def _body(self, request: web.Request) -> bytes | None:
        """The body, or None when it exceeds the limit; a client that sends it too slowly is
        answered 400 rather than holding a connection open for ever."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._body_timeout_s):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > self._max_body_bytes:
                        return None
                    chunks.append(chunk)
        except TimeoutError:
            raise web.HTTPBadRequest(reason="body not received in time") from None
        return b"".join(chunks)

    async def _judge(
        self, path: str, org: UUID, items: list[Any]
    ) -> tuple[Verdict, list[tuple[str, bytes, dict[str, str]]]]:
        verdict = Verdict()
        outbound = []
        now = datetime.now(UTC)
        judge = self._judges[path]
        for index, item in enumerate(items):
            try:
                message = to_ingest(path, item, org, now)
                [outcome] = await judge(message)
            except Refused as refused:
                outcome = rejected(path, item, refused.reason, refused.detail, now)
            except Exception as exc:  # the unit or device directory: the database away
                raise Unavailable(f"validation: {exc!r}") from exc
            if isinstance(outcome, Reject):
                reject = rejected(path, item, outcome.reason, outcome.detail, now)
                verdict.refuse(index, reject.reason, reject.detail)
                count_reject(self._metrics, reject.reason)
                body, headers = encode(reject)
                outbound.append((f"dlq.{reject.reason}", body, headers))
                continue
            verdict.accepted += 1
            body, headers = encode(message)
            outbound.append((ingest_subject(message.topic), body, headers))
        return verdict, outbound

    async def _store(self, outbound: list[tuple[str, bytes, dict[str, str]]]) -> None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                futures = [
                    await self._js.publish_async(subject, body, headers=headers or None)
                    for subject, body, headers in outbound
                ]
                await asyncio.gather(*futures)
        except Exception as exc:
            raise Unavailable(f"JetStream: {exc!r}") from exc

    async def _last(self, request: web.Request) -> web.Response:
        org = await self._organization(request)
        if org is None:
            return _unauthorized()
        query = request.query
        try:
            limit = int(query.get("limit", "10"))
        except ValueError:
            return _error(400, "limit must be an integer from 1 to 1000")
        if not 1 <= limit <= 1000:
            return _error(400, "limit must be an integer from 1 to 1000")
        filters, args = ["organization_id = $1"], list[Any]([org])
        for name in ("site", "device"):
            value = query.get(name)
            if value is None:
                continue
            if not NAME_PATTERN.fullmatch(value):
                return _error(400, f"{name} must be 1 to 64 characters of A-Z a-z 0-9 _ -")
            args.append(value)
            filters.append(f"{name} = ${len(args)}")
        args.append(limit)
        sql = (
            f"SELECT {', '.join(LAST_COLUMNS)} FROM bess_telemetry WHERE {' AND '.join(filters)} "
            f"ORDER BY ts DESC LIMIT ${len(args)}"
        )
        try:
            rows = await self._db.fetch(sql, *args)
        except Exception as exc:
            raise Unavailable(f"database: {exc!r}") from exc
        return web.json_response([_sample(row) for row in rows])

    async def _healthz(self, _: web.Request) -> web.Response:
        ok, body = self._health.overall()
        return web.json_response(body, status=200 if ok else 503)


def _sample(row: Any) -> dict[str, Any]:
    out = {name: row[name] for name in LAST_COLUMNS}
    out["ts"] = row["ts"].astimezone(UTC).isoformat().replace("+00:00", "Z")
    out["alarms"] = list(row["alarms"])
    return out


def _error(status: int, detail: str) -> web.Response:
    return web.json_response({"error": detail}, status=status)


def _unauthorized() -> web.Response:
    response = _error(401, "a valid token is needed: Authorization: Bearer <token>")
    response.headers["WWW-Authenticate"] = 'Bearer realm="messwerte"'
    return response


def _too_large(limit: int) -> web.Response:
    return _error(413, f"body larger than {limit} bytes")
