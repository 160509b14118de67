"""Services going away mid-stream: PostgreSQL stopped, nats-server restarted, the MQTT broker
restarted, and all of it (with a SIGKILL) in one run. The result must equal the reference."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.conftest import Stack
from tests.faults.harness import DRAIN_LIMIT_S, Fault, Worker, Workers, until

# Servers are stopped and started on the test's own thread, blocking it for a moment: a server
# started from an executor thread would die with that thread (see devstack's PDEATHSIG).


def postgres_down(stack: Stack, seconds: float) -> Fault:
    async def fault() -> None:
        stack.postgres.stop()
        await asyncio.sleep(seconds)  # the outage itself, not a wait for something
        stack.postgres.start()

    return fault


#: A restart of nats-server takes some 80 ms, which nats-py rides out by buffering; down this
#: long, publishes, fetches and acks fail and the reconnect paths run.
NATS_DOWN_S = 5.0


def nats_restarted(stack: Stack) -> Fault:
    async def fault() -> None:
        stack.nats.stop()
        await asyncio.sleep(NATS_DOWN_S)  # the outage itself, not a wait for something
        stack.nats.start()

    return fault


def broker_restarted(stack: Stack) -> Fault:
    async def fault() -> None:
        stack.broker.process.restart()

    return fault


def killed(workers: Workers, name: str) -> Fault:
    async def fault() -> None:
        await asyncio.to_thread(workers[name].kill)
        workers[name].start()

    return fault


async def test_postgresql_stopped_for_30_seconds_mid_stream_loses_nothing(stack: Stack) -> None:
    """Persist holds its batch in progress and retries; nothing is dropped or doubled."""
    await stack.run(
        "PostgreSQL stopped for 30 s (fused)",
        "fused",
        lambda _: [(0.3, postgres_down(stack, 30))],
        seed=21,
    )


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_nats_server_restarted_mid_stream_loses_nothing(stack: Stack, mode: str) -> None:
    """Every pull consumer, the bridge and the publisher come back after the restart."""
    await stack.run(
        f"nats-server down for 5 s ({mode})",
        mode,
        lambda _: [(0.4, nats_restarted(stack))],
        seed=22,
    )


async def test_mqtt_broker_restarted_mid_stream_loses_nothing(stack: Stack) -> None:
    """The persistent session and its queued messages survive the broker's restart."""
    await stack.run(
        "MQTT broker restarted (fused)",
        "fused",
        lambda _: [(0.4, broker_restarted(stack))],
        seed=23,
    )


async def test_kill_database_outage_and_both_restarts_in_one_run_lose_nothing(
    stack: Stack,
) -> None:
    """What the acceptance check does: SIGKILL `pipeline run`, stop PostgreSQL for 15 s,
    restart the broker and nats-server, all while the data set is being published."""
    await stack.run(
        "all of it in one run: SIGKILL, PostgreSQL 15 s, broker restarted, nats-server 5 s",
        "fused",
        lambda workers: [
            (0.15, killed(workers, "fused")),
            (0.35, postgres_down(stack, 15)),
            (0.6, broker_restarted(stack)),
            (0.8, nats_restarted(stack)),
        ],
        seed=24,
    )


async def _unhealthy(worker: Worker) -> bool:
    return await asyncio.to_thread(worker.health) == 503


def terminated_while_down(stack: Stack, workers: Workers, server: str) -> Fault:
    """SIGTERM while `server` is away and the worker holds work it cannot finish: it leaves it
    unacknowledged and exits 0 in time; the restarted worker finishes it."""
    process = stack.postgres if server == "postgres" else stack.nats

    async def fault() -> None:
        process.stop()
        worker = workers["fused"]
        await until(lambda: _unhealthy(worker), f"the worker reports {server} down", timeout_s=30)
        code, drained_s = await asyncio.to_thread(workers["fused"].terminate)
        assert code == 0, workers["fused"].tail()
        assert drained_s < DRAIN_LIMIT_S
        process.start()
        workers["fused"].start()

    return fault


@pytest.mark.parametrize("server", ["postgres", "nats"])
async def test_sigterm_during_an_outage_exits_0_in_time_and_loses_nothing(
    stack: Stack, server: str
) -> None:
    name = "PostgreSQL" if server == "postgres" else "nats-server"
    await stack.run(
        f"SIGTERM while {name} is down, then restarted (fused)",
        "fused",
        lambda workers: [(0.5, terminated_while_down(stack, workers, server))],
        seed=25,
    )
