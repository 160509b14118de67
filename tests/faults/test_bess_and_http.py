"""The fault suite with BESS telemetry and HTTP gateways in the data set: a SIGKILL while BESS
samples are being stored, a PostgreSQL outage, and nats-server down while gateways POST (they
get 503 or no answer, post again, and nothing is lost or doubled)."""

from __future__ import annotations

import asyncio
import time

from tests.faults.bess import Gateways
from tests.faults.conftest import Stack
from tests.faults.harness import Fault, Workers, table_locked, until, waiting_on_locks
from tests.faults.test_outages import NATS_DOWN_S, postgres_down


def killed_storing_bess(stack: Stack, workers: Workers) -> Fault:
    """SIGKILL once the worker's statement on `bess_telemetry` waits on a lock we hold."""

    async def fault() -> None:
        async with table_locked(stack.dsn, "bess_telemetry") as holder:

            async def blocked() -> bool:
                return await waiting_on_locks(holder) > 0

            await until(blocked, "BESS persist held mid-batch")
            await asyncio.to_thread(workers["fused"].kill)
            await holder.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        await asyncio.sleep(1.0)  # the outage itself, not a wait for something
        workers["fused"].start()

    return fault


async def test_sigkill_while_storing_bess_samples_loses_nothing(stack: Stack) -> None:
    await stack.run(
        "SIGKILL fused worker while storing BESS samples",
        "fused",
        lambda workers: [(0.4, killed_storing_bess(stack, workers))],
        seed=31,
        bess=True,
    )


async def test_postgresql_stopped_with_bess_traffic_loses_nothing(stack: Stack) -> None:
    await stack.run(
        "PostgreSQL stopped for 30 s, meters and BESS (fused)",
        "fused",
        lambda _: [(0.3, postgres_down(stack, 30))],
        seed=32,
        bess=True,
    )


def nats_down_while_posting(stack: Stack, gateways: Gateways) -> Fault:
    """nats-server stopped; then the gateways' last batches go out, and it stays down until
    one of them has been refused, then the rest of NATS_DOWN_S."""

    async def fault() -> None:
        stack.nats.stop()
        started = time.monotonic()
        gateways.release.set()
        await until(gateways.refused, "a gateway answered 503 or not at all")
        await asyncio.sleep(max(0.0, NATS_DOWN_S - (time.monotonic() - started)))  # the outage
        stack.nats.start()

    return fault


async def test_nats_down_while_gateways_post_loses_and_doubles_nothing(stack: Stack) -> None:
    gateways = Gateways(stack.api_port, stack.token, hold_last=True)
    await stack.run(
        "nats-server down for 5 s while gateways POST (fused)",
        "fused",
        lambda _: [(0.4, nats_down_while_posting(stack, gateways))],
        seed=33,
        bess=True,
        gateways=gateways,
    )
    refused = gateways.answered[503] + gateways.answered[0]
    assert refused > 0, f"no gateway met the outage: {gateways.answered}"
    assert gateways.answered[202] > 0
