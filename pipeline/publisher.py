"""Drives stage `publish`: moves the rows of an outbox table (`messwerte_outbox` onto
`messwerte.>`, `bess_interval_outbox` onto `intervals.bess.>`) to JetStream.

Woken by `LISTEN {table}` (a trigger notifies on every insert) and, as a safety net,
once a second. Rows are claimed with `FOR UPDATE SKIP LOCKED`, published with their
`Nats-Msg-Id`, and deleted in the same transaction only after JetStream stored them; a crash
in between re-publishes, which JetStream's duplicate window turns into a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
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


@dataclass
class _Batch:
    """Claimed outbox rows, sent and waiting to be stored; `stack` holds their transaction."""

    stack: contextlib.AsyncExitStack
    conn: Any
    rows: list[Any]
    outbound: list[Any]
    sent: list[asyncio.Future[Any]]
    #: What the rows became (`messwertmessage`, `bessintervalmessage`), for the stage metrics.
    kind: str


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
                    await self._drain()
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

    async def _drain(self) -> None:
        """Publish every row in the outbox, a batch at a time. While JetStream stores one
        batch (with `sync_interval: always`, one fsync per message: about 4,500 messages/s on
        the bench machine), the next is claimed and sent, so the database round trips and the
        encoding overlap with the storing. Batches are sent in claim order on one connection,
        so JetStream stores them in that order; a batch leaves the outbox, in the transaction
        that claimed it, once every one of its messages is stored."""
        pending: _Batch | None = None
        batch: _Batch | None = None
        try:
            while True:
                batch = await self._claim_and_send()
                if pending is not None:
                    done, pending = pending, None
                    await self._finish(done)
                if batch is None:
                    return
                if len(batch.rows) < CLAIM_LIMIT:
                    done, batch = batch, None
                    await self._finish(done)
                    return
                pending, batch = batch, None
        finally:
            for left in (pending, batch):  # sent, not finished: rolled back, published again
                if left is not None:
                    await left.stack.__aexit__(*sys.exc_info())

    async def _claim_and_send(self) -> _Batch | None:
        stack = contextlib.AsyncExitStack()
        try:
            conn = await stack.enter_async_context(self._pool.acquire())
            await stack.enter_async_context(conn.transaction())
            rows = await self.outbox.claim(conn, CLAIM_LIMIT)
            if not rows:
                await stack.aclose()
                return None
            outbound = []
            for row in rows:
                message = self.outbox.to_message(row)
                body, headers = encode(message)
                outbound.append((message.subject, body, headers))
            sent = await self._out.send(outbound)
        except BaseException:
            await stack.__aexit__(*sys.exc_info())
            raise
        return _Batch(stack, conn, rows, outbound, sent, type(message).__name__.lower())

    async def _finish(self, batch: _Batch) -> None:
        try:
            await self._out.stored(batch.outbound, batch.sent)
            await self.outbox.done(batch.conn, [row["id"] for row in batch.rows])
        except BaseException:
            await batch.stack.__aexit__(*sys.exc_info())
            raise
        await batch.stack.aclose()  # commits
        self._metrics.published_from[self.outbox.table].inc(len(batch.rows))
        self._metrics.stage_out.labels("publish", batch.kind).inc(len(batch.rows))

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
