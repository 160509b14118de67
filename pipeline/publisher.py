"""Drives stage `publish`: moves the rows of an outbox table (`messwerte_outbox` onto
`messwerte.>`, `bess_interval_outbox` onto `intervals.bess.>`) to JetStream.

Woken by `LISTEN {table}` (a trigger notifies on every insert) and, as a safety net,
once a second. Rows are claimed oldest first with `FOR UPDATE SKIP LOCKED`, published with
their `Nats-Msg-Id`, and deleted in the same transaction only after JetStream stored them; a
crash in between re-publishes, which JetStream's duplicate window turns into a no-op.

The order of an interval's revisions on the stream is the order of its outbox rows, so one
replica publishes an outbox at a time (its claim `publish` or `publish_bess`, design §14), one
batch at a time, and within a batch `JetStreamOut` keeps each subject's order through failed
publishes. Two batches in flight would let a retried message of the first land after a later
revision in the second. A publisher that takes over first writes its name into
`pipeline_fence`, which waits until the batches of the one before it have ended (a hung one's
transaction is ended by PostgreSQL after `idle_in_transaction_session_timeout`, the failover
time); every batch checks that name under a shared lock before it publishes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from pipeline.claims import Fenced, Gate
from pipeline.codec import encode
from pipeline.database import TimedPool
from pipeline.metrics import Metrics
from pipeline.publishing import JetStreamOut
from pipeline.retry import Abandoned, Backoff, first_of
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
        gate: Gate | None = None,
        holder: str = "",
        failover_s: float = 10.0,
    ) -> None:
        self.outbox = outbox
        self._pool = pool
        self._dsn = dsn
        self._metrics = metrics
        self._stop = stop
        self._out = JetStreamOut(js, stop, streams=streams, gate=gate)
        self._wake = asyncio.Event()
        self._gate = gate
        self._holder = holder
        self._idle_ms = int(failover_s * 1000)
        #: What the rows become (`messwertmessage`, `bessintervalmessage`), for stage metrics.
        self._kind = ""
        self.healthy = False

    @property
    def role(self) -> str:
        return "active" if self._gate is None else self._gate.role

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen())
        backoff = Backoff(self._stop)
        fenced = self._gate is not None
        try:
            while not self._stop.is_set():
                if self._gate is not None and not self._gate.valid():
                    self.healthy = True  # a standby is healthy
                    self._gate.acting = False
                    if not await self._gate.acquired(self._stop):
                        break
                    fenced = True
                try:
                    if fenced:
                        await self._take_fence()
                        fenced = False
                    await self._drain()
                    self.healthy = True
                    backoff = Backoff(self._stop)
                except Abandoned:
                    break
                except Fenced as exc:
                    log.warning("standing by", outbox=self.outbox.table, reason=str(exc))
                    fenced = True
                    continue
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
            if self._gate is not None:
                self._gate.acting = False

    async def _take_fence(self) -> None:
        """Write our name into the fence; waits for the batches of the holder before us."""
        if self._gate is None:
            return
        self._gate.acting = True
        await self._pool.execute(
            "INSERT INTO pipeline_fence (name, holder) VALUES ($1, $2) ON CONFLICT (name) "
            "DO UPDATE SET holder = EXCLUDED.holder, taken_at = NOW()",
            self.outbox.table,
            self._holder,
        )
        log.info("outbox publisher active", outbox=self.outbox.table, holder=self._holder)

    async def _drain(self) -> None:
        """Publish every row in the outbox, a batch at a time."""
        while await self._batch() == CLAIM_LIMIT:
            pass

    async def _batch(self) -> int:
        async with self._pool.transaction() as conn:
            if self._gate is not None:
                self._check_gate()
                # A transaction left open by a publisher that hangs is ended by the server,
                # so that one taking over does not wait on it for longer than the failover.
                await conn.execute(
                    f"SET LOCAL idle_in_transaction_session_timeout = {self._idle_ms}"
                )
                holder = await conn.fetchval(
                    "SELECT holder FROM pipeline_fence WHERE name = $1 FOR SHARE",
                    self.outbox.table,
                )
                if holder != self._holder:
                    raise Fenced(f"the fence names {holder}")
            rows = await self.outbox.claim(conn, CLAIM_LIMIT)
            if not rows:
                return 0
            outbound = []
            for row in rows:
                message = self.outbox.to_message(row)
                body, headers = encode(message)
                outbound.append((message.subject, body, headers))
            self._kind = type(message).__name__.lower()
            self._check_gate()
            await self._out.publish(outbound)
            await self.outbox.done(conn, [row["id"] for row in rows])
        self._metrics.published_from[self.outbox.table].inc(len(rows))
        self._metrics.stage_out.labels("publish", self._kind).inc(len(rows))
        return len(rows)

    def _check_gate(self) -> None:
        if self._gate is not None:
            self._gate.check()

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
