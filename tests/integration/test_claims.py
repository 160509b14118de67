"""The claims mechanism on its own (pipeline/claims.py), against a real nats-server: one holder
at a time, takeover when the holder stops renewing, immediate handover on release, and a
holder that cannot reach NATS stops acting before its claim can be taken."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats

from pipeline.claims import FENCE_FRACTION, Claims, Gate
from pipeline.devstack import NatsServer
from tests.conftest import eventually

FAILOVER_S = 2.0


@contextlib.asynccontextmanager
async def worker(url: str, names: list[str]) -> AsyncIterator[tuple[Claims, Gate, asyncio.Event]]:
    """A worker's claims, running until the block ends (which releases them)."""
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    claims = await Claims.open(nc.jetstream(), failover_s=FAILOVER_S)
    gate = claims.gate(names)
    stop = asyncio.Event()
    task = asyncio.create_task(claims.run(stop))
    try:
        yield claims, gate, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        with contextlib.suppress(Exception):  # a test may have killed the server
            await nc.close()


async def test_one_holder_at_a_time_and_the_other_is_standby(nats_server: NatsServer) -> None:
    async with (
        worker(nats_server.url, ["mqtt"]) as (_, first, stop1),
        worker(nats_server.url, ["mqtt"]) as (_, second, _stop2),
    ):
        assert await first.acquired(stop1) or await second.acquired(stop1)
        for _ in range(20):  # over several renewals, never both, never neither
            assert first.valid() != second.valid()
            await asyncio.sleep(FAILOVER_S / 10)


async def test_release_hands_over_at_once(nats_server: NatsServer) -> None:
    async with worker(nats_server.url, ["mqtt"]) as (_, first, stop1):
        assert await first.acquired(stop1)
        async with worker(nats_server.url, ["mqtt"]) as (standby, second, stop2):
            await asyncio.sleep(FAILOVER_S / 4)
            assert not second.valid()
            assert standby.status()[1]["claims"]["mqtt"]["role"] == "standby"
            stop1.set()  # the first worker stops cleanly and releases
            started = time.monotonic()
            assert await second.acquired(stop2)
            assert time.monotonic() - started < FAILOVER_S / 2


async def test_a_holder_that_stops_renewing_is_taken_over_within_the_failover_time(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    frozen = await Claims.open(nc.jetstream(), failover_s=FAILOVER_S)
    hung = frozen.gate(["dedupe.zev"])
    await frozen._step()  # takes it once, then never renews: a hung or killed holder
    assert hung.valid()
    taken_at = time.monotonic()
    async with worker(nats_server.url, ["dedupe.zev"]) as (_, standby, stop):
        assert await standby.acquired(stop)
        waited = time.monotonic() - taken_at
        # Not before the hung holder's own deadline, and within the failover time.
        assert not hung.valid()
        assert FAILOVER_S * 0.85 * FENCE_FRACTION <= waited <= FAILOVER_S + 0.5
    await nc.close()


async def test_claims_are_taken_in_order_so_two_workers_do_not_split_them(
    nats_server: NatsServer,
) -> None:
    names = ["dedupe.zev", "mqtt", "validate.zev"]
    async with (
        worker(nats_server.url, names) as (_, first, stop),
        worker(nats_server.url, names) as (_, second, _),
    ):
        assert await first.acquired(stop) or await second.acquired(stop)
        await asyncio.sleep(FAILOVER_S)
        active = first if first.valid() else second
        standby = second if active is first else first
        assert active.valid()
        assert not any(standby._claims.leases[n].held for n in names)


async def test_a_holder_cut_off_from_nats_stops_before_its_claim_expires(tmp_path: object) -> None:
    server = NatsServer(tmp_path / "nats").start()  # type: ignore[operator]
    try:
        async with worker(server.url, ["publish.messwerte_outbox"]) as (claims, gate, stop):
            assert await gate.acquired(stop)
            gate.acting = True
            server.kill()
            cut_at = time.monotonic()
            await eventually(lambda: _now(gate.valid()), lambda valid: not valid, timeout_s=10)
            assert time.monotonic() - cut_at <= claims.ttl_s * FENCE_FRACTION + 0.2
            healthy, body = claims.status()
            assert not healthy  # acting on a claim it no longer holds
            assert body["claims"]["publish.messwerte_outbox"]["role"] == "standby"
            gate.acting = False
            assert claims.status()[0]
    finally:
        server.stop()


async def _now(value: bool) -> bool:
    return value
