"""SIGKILL of a worker in the middle of a batch, restarted as a supervisor would: nothing lost,
nothing counted twice, in `zaehler_rohdaten`, `messwerte` and the replayed `MESSWERTE` stream.

A kill between two batches proves little, so each kill first holds the worker mid-batch: its
output (the next stream, or the table it writes) refuses or blocks, and the kill comes once
NATS shows its input handed out and unacknowledged, or PostgreSQL shows it waiting on the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.faults.conftest import Stack
from tests.faults.harness import (
    Fault,
    Worker,
    Workers,
    outbox_claimed,
    stream_refusing,
    table_locked,
    unacknowledged,
    until,
    waiting_on_locks,
)

#: How long a killed worker stays down before its supervisor starts it again.
DOWN_S = 1.0

Witness = Callable[[], Awaitable[bool]]


@contextlib.asynccontextmanager
async def mid_batch(stack: Stack, stage: str, worker: Worker) -> AsyncIterator[Witness]:
    """Hold `stage` in the middle of a batch; yield a probe that says when it is held."""
    url = stack.nats.url
    # A worker declares its streams as it starts, which would undo a refusing stream's limit:
    # a worker just restarted by an earlier fault must be up before its output is made to refuse.
    await until(lambda: asyncio.to_thread(lambda: worker.health() == 200), f"{stage} up")
    if stage in ("mqtt_bridge", "validate", "dedupe", "publish"):
        output = {"mqtt_bridge": "INGEST", "validate": "VALID", "dedupe": "UNIQUE"}
        received = "zev_mqtt_messages_received_total"
        before = await asyncio.to_thread(worker.metric, received) if stage == "mqtt_bridge" else 0
        async with stream_refusing(url, output.get(stage, "MESSWERTE")):
            if stage == "mqtt_bridge":

                async def received_more() -> bool:
                    return await asyncio.to_thread(worker.metric, received) > before

                yield received_more
            elif stage == "publish":
                # Something to publish, now: a new reading in a closed interval is summed at
                # once, and its aggregate waits in the outbox, claimed, while MESSWERTE refuses.
                await stack.nudge()
                yield lambda: outbox_claimed(stack.dsn)
            else:
                source = {"validate": "INGEST", "dedupe": "VALID"}[stage]
                yield lambda: _positive(unacknowledged(url, source, stage))
        return
    table = "messwerte" if stage == "window_aggregate" else "zaehler_rohdaten"
    async with table_locked(stack.dsn, table) as holder:
        # Fused, the bridge feeds persist in memory: the readings it holds are unacknowledged
        # at the broker, and the statement waiting on the lock is the witness.
        consumer = {"persist": ("UNIQUE", "persist")}

        async def blocked() -> bool:
            if stage in consumer and not await unacknowledged(url, *consumer[stage]):
                return False
            return await waiting_on_locks(holder) > 0

        yield blocked
        # The killed worker's statements still wait on the lock and would commit once it is
        # released; end them, as PostgreSQL does when it notices the client is gone, so the
        # kill also covers "died before commit".
        await holder.execute("SELECT pg_stat_clear_snapshot()")
        await holder.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0


def kill_mid_batch(stack: Stack, workers: Workers, name: str, stage: str) -> Fault:
    async def fault() -> None:
        async with mid_batch(stack, stage, workers[name]) as held:
            await until(held, f"{stage} held mid-batch")
            await asyncio.to_thread(workers[name].kill)
        await asyncio.sleep(DOWN_S)  # the outage itself, not a wait for something
        workers[name].start()

    return fault


@pytest.mark.parametrize("stage", Workers.SPLIT)
async def test_sigkill_of_a_split_stage_worker_mid_batch_loses_nothing(
    stack: Stack, stage: str
) -> None:
    await stack.run(
        f"SIGKILL `{stage}` worker mid-batch (split)",
        "split",
        lambda workers: [(0.4, kill_mid_batch(stack, workers, stage, stage))],
        seed=Workers.SPLIT.index(stage),
    )


async def test_sigkill_of_the_fused_worker_three_times_mid_batch_loses_nothing(
    stack: Stack,
) -> None:
    """Killed while storing readings, while summing intervals, and while publishing them."""
    await stack.run(
        "SIGKILL fused worker mid-batch, 3 times",
        "fused",
        lambda workers: [
            (0.25, kill_mid_batch(stack, workers, "fused", "persist_fused")),
            (0.5, kill_mid_batch(stack, workers, "fused", "window_aggregate")),
            (0.75, kill_mid_batch(stack, workers, "fused", "publish")),
        ],
        seed=11,
    )
