"""Drives stage `publish`: moves the rows of an outbox table (`messwerte_outbox` onto
`messwerte.>`, `bess_interval_outbox` onto `intervals.bess.>`) to JetStream.

Woken by `LISTEN {table}` (a trigger notifies on every insert) and, as a safety net,
once a second. Rows are claimed with `FOR UPDATE SKIP LOCKED`, published with their
`Nats-Msg-Id`, and deleted in the same transaction only after JetStream stored them; a crash
in between re-publishes, which JetStream's duplicate window turns into a no-op.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from pipeline.codec import encode
from pipeline.database import TimedPool
from pipeline.metrics import Metrics
from pipeline.retry import Abandoned, Backoff, first_of
from pipeline.runner import JetStreamOut
from pipeline.topology import StreamPolicy
from stages.publish import Outbox

log = structlog.get_logger("pipeline.publisher")

POLL_S = 1.0
CLAIM_LIMIT = 500


class OutboxPublisher:
    def __init__(
        self,
        pool: TimedPool,
        dsn: str,
        js: Any,
        metrics: Metrics,
        stop: asyncio.Event,
        outbox: Outbox,
        streams: StreamPolicy | None = None,
    ) -> None:
        self.outbox = outbox
        self._pool = pool
        self._dsn = dsn
        self._metrics = metrics
        self._stop = stop
        self._out = JetStreamOut(js, stop, streams=streams)
        self._wake = asyncio.Event()
        self.healthy = False

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen())
        backoff = Backoff(self._stop)
        try:
            while not self._stop.is_set():
                try:
                    while await self._drain_once() == CLAIM_LIMIT:
                        pass
                    self.healthy = True
                    backoff = Backoff(self._stop)
                except Abandoned:
                    break
                except Exception as exc:
                    self.healthy = False
                    log.warning("outbox publish failed, retrying", error=repr(exc))
                    try:
                        await backoff.wait()
                    except Abandoned:
                        break
                    continue
                self._wake.clear()
                await first_of(self._wake, self._stop, timeout_s=POLL_S)
        finally:
            listener.cancel()

    async def _drain_once(self) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await self.outbox.claim(conn, CLAIM_LIMIT)
            if not rows:
                return 0
            messages = [self.outbox.to_message(row) for row in rows]
            outbound = []
            for message in messages:
                body, headers = encode(message)
                outbound.append((message.subject, body, headers))
            await self._out.publish(outbound)
            await self.outbox.done(conn, [row["id"] for row in rows])
        self._metrics.published_from[self.outbox.table].inc(len(messages))
        kind = type(messages[0]).__name__.lower()
        self._metrics.stage_out.labels("publish", kind).inc(len(messages))
        return len(rows)

    async def _listen(self) -> None:
        """Keep a LISTEN connection open; reconnect quietly, polling covers the gaps."""
        while not self._stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _, closed=closed: closed.set())
                await conn.add_listener(self.outbox.channel, lambda *_: self._wake.set())
                self._wake.set()
                await first_of(closed, self._stop)
            except Exception as exc:
                log.debug("outbox listener reconnecting", error=repr(exc))
                await asyncio.sleep(POLL_S)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
