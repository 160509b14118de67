"""The fault suite on a 3-node JetStream cluster with R3 streams (design §14): node loss, a
paused node, a rolling restart, and replicas of every stage killed while they hold what they
hold. Each scenario compares the tables and the replayed output streams with the reference,
times how long each fault stops the pipeline, and counts the MQTT session takeovers.

Every trigger is a condition the test reads, never a moment it hopes for: the node to kill is
the one the cluster names as a stream's leader, the worker to kill the one whose `/health`
says it is active for a claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import nats
import pytest

from pipeline.devstack import Mosquitto, NatsCluster, NatsServer, Postgres
from tests.conftest import Broker
from tests.faults.conftest import Stack, seeded
from tests.faults.harness import Fault, Worker, Workers, until

#: The pipeline's own streams and the claims bucket; a node "leading no stream" leads none.
STREAMS = (
    "INGEST",
    "VALID",
    "UNIQUE",
    "PERSISTED",
    "DLQ",
    "MESSWERTE",
    "BESS_INTERVALS",
    "KV_pipeline_claims",
)
#: Longest a fault may stop the pipeline (design §14: carries on within 30 s).
CARRIES_ON_S = 30.0
#: The cluster's readings go slower than the single server's, so that faults that take
#: seconds (a paused node, a rolling restart) happen while the fleet still publishes.
RATE_PER_S = 60.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()


@pytest.fixture
async def cstack(
    postgres_server: Postgres,
    cluster: NatsCluster,
    mqtt_broker: Broker,
    database: str,
    tmp_path: Path,
) -> Stack:
    token = await seeded(database)
    return Stack(
        postgres_server,
        cluster,
        mqtt_broker,
        database,
        tmp_path,
        token,
        extra_env={"PIPELINE_STREAM_REPLICAS": "3", "PIPELINE_FAILOVER_SECONDS": "10"},
    )


# --- what the faults need to know --------------------------------------------------------------


async def leaders(cluster: NatsCluster) -> dict[str, str]:
    """Stream -> the server name of its leader, as the cluster says."""
    nc = await nats.connect(cluster.url.split(","))
    try:
        js = nc.jetstream(timeout=5)
        found = {}
        for name in STREAMS:
            with contextlib.suppress(Exception):
                info = await js.stream_info(name)
                if info.cluster is not None and info.cluster.leader:
                    found[name] = info.cluster.leader
        return found
    finally:
        await nc.close()


async def leader_of(cluster: NatsCluster, stream: str) -> NatsServer:
    found: dict[str, str] = {}

    async def known() -> bool:
        found.update(await leaders(cluster))
        return stream in found

    await until(known, f"a leader of {stream}")
    return cluster.node(found[stream])


async def lead_nothing(cluster: NatsCluster, node: NatsServer) -> None:
    """Move every stream leader off `node` (a step-down naming another node as preferred)."""
    others = [str(n.server_name) for n in cluster.nodes if n is not node]

    def moves(led: dict[str, str]) -> dict[str, str]:
        mine = [s for s, leader in led.items() if leader == node.server_name]
        return {stream: others[position % len(others)] for position, stream in enumerate(mine)}

    await _move_leaders(cluster, moves, f"{node.server_name} leads no stream")


async def lead(cluster: NatsCluster, node: NatsServer, streams: Sequence[str]) -> None:
    """Move the leaders of `streams` to `node` (a step-down naming it as preferred)."""

    def moves(led: dict[str, str]) -> dict[str, str]:
        return {s: str(node.server_name) for s in streams if led.get(s) != node.server_name}

    await _move_leaders(cluster, moves, f"{node.server_name} leads {', '.join(streams)}")


async def _move_leaders(
    cluster: NatsCluster, moves: Callable[[dict[str, str]], dict[str, str]], what: str
) -> None:
    """Step down the leader of each stream `moves` names, towards the node it names, until
    `moves` names none (a step-down is a request the cluster may take a moment to carry out)."""
    nc = await nats.connect(cluster.url.split(","))
    try:

        async def done() -> bool:
            wanted = moves(await leaders(cluster))
            for stream, preferred in wanted.items():
                request = {"placement": {"preferred": preferred}}
                with contextlib.suppress(Exception):
                    await nc.request(
                        f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
                        json.dumps(request).encode(),
                        timeout=5,
                    )
            return not wanted

        await until(done, what, timeout_s=60)
    finally:
        await nc.close()


async def current(cluster: NatsCluster, node: NatsServer) -> None:
    """After a restart: the node is back and every stream has a leader again."""
    await asyncio.to_thread(node._wait_ready)
    await asyncio.to_thread(cluster.wait_for_meta_leader)
    await until(
        lambda: _all_led(cluster), "every stream led after the restart", timeout_s=CARRIES_ON_S
    )


async def _all_led(cluster: NatsCluster) -> bool:
    return set(await leaders(cluster)) >= set(STREAMS) - {"BESS_INTERVALS"}


async def active(workers: Workers, claim: str) -> Worker:
    holder: list[Worker] = []

    async def found() -> bool:
        with contextlib.suppress(LookupError):
            holder[:] = [await asyncio.to_thread(workers.holder, claim)]
        return bool(holder)

    await until(found, f"a worker active for {claim}")
    return holder[0]


def takeovers(broker: Broker, client_id: str) -> int | None:
    """Sessions of the bridge's client id after the first, from mosquitto's log: each is a
    replica (or the same one again) taking the session over. None: the broker does not say."""
    if not isinstance(broker.process, Mosquitto):
        return None
    text = broker.process.log_path.read_text(errors="replace")
    return text.count(f" as {client_id} (") - 1


# --- the faults ------------------------------------------------------------------------------


def killing_node(
    stack: Stack, pick: Callable[[], Awaitable[NatsServer]], *, pause_s: float = 0.0
) -> Fault:
    """A fault that SIGKILLs (or, with `pause_s`, SIGSTOPs for that long) the node `pick`
    returns, times the pipeline until it carries on, and brings the node back."""

    async def fault() -> None:
        node = await pick()
        progress = stack.progress()
        await progress.mark()
        struck = time.monotonic()
        if pause_s:
            node.pause()
        else:
            node.kill()
        try:
            stack.stalls.append(await progress.resumed(CARRIES_ON_S))
        finally:
            if pause_s:
                await asyncio.sleep(max(0.0, pause_s - (time.monotonic() - struck)))
                node.resume()
            else:
                await asyncio.to_thread(node.restart)  # the node rejoins with its store
        await current(_cluster(stack), node)

    return fault


def _cluster(stack: Stack) -> NatsCluster:
    assert isinstance(stack.nats, NatsCluster)
    return stack.nats


def killing_worker(stack: Stack, claim: str, *, restart: bool = True) -> Callable[[Workers], Fault]:
    """A fault that SIGKILLs the worker active for `claim` (read from /health), times the
    takeover and, as a supervisor would, starts it again (as a standby)."""

    def make(workers: Workers) -> Fault:
        async def fault() -> None:
            worker = await active(workers, claim)
            progress = stack.progress()
            await progress.mark()
            worker.kill()
            stack.stalls.append(await progress.resumed(CARRIES_ON_S))
            if restart:
                await restarted(worker)

        return fault

    return make


async def restarted(worker: Worker) -> None:
    """Start a killed worker again, as its supervisor would, and wait until it is up."""
    worker.start()
    await until(lambda: asyncio.to_thread(lambda: worker.health() == 200), f"{worker.name} up")


async def run(
    stack: Stack,
    name: str,
    mode: str,
    faults: Callable[[Workers], Sequence[tuple[float, Fault]]],
    *,
    bess: bool = True,
    failovers: int,
) -> None:
    figures = await stack.run(
        name,
        mode,
        faults,
        bess=bess,
        replicas=2,
        xyx=True,
        rate_per_s=RATE_PER_S,
        timeout_s=120,
    )
    assert figures.revision_gaps == 0
    assert figures.stalled_s <= CARRIES_ON_S, figures.stalled_s
    count = takeovers(stack.broker, stack.env()["PIPELINE_MQTT_CLIENT_ID"])
    if count is not None:  # at most one takeover per failover, never a tug of war
        assert count <= failovers, f"{count} session takeovers for {failovers} failovers"


# --- the scenarios ---------------------------------------------------------------------------


async def test_sigkill_of_the_node_leading_messwerte(cstack: Stack) -> None:
    cluster = _cluster(cstack)
    fault = killing_node(cstack, lambda: leader_of(cluster, "MESSWERTE"))
    await run(cstack, "cluster: SIGKILL the node leading MESSWERTE", "fused",
              lambda _: [(0.3, fault)], failovers=1)  # fmt: skip


async def test_sigkill_of_the_node_leading_ingest_in_split_mode(cstack: Stack) -> None:
    cluster = _cluster(cstack)
    fault = killing_node(cstack, lambda: leader_of(cluster, "INGEST"))
    await run(cstack, "cluster, split ×2: SIGKILL the node leading INGEST", "split",
              lambda _: [(0.3, fault)], bess=False, failovers=1)  # fmt: skip


async def test_sigkill_of_a_node_leading_no_stream(cstack: Stack) -> None:
    cluster = _cluster(cstack)

    async def follower() -> NatsServer:
        node = cluster.nodes[0]
        await lead_nothing(cluster, node)
        return node

    fault = killing_node(cstack, follower)
    await run(cstack, "cluster: SIGKILL a node leading no stream", "fused",
              lambda _: [(0.3, fault)], failovers=1)  # fmt: skip


async def test_a_node_paused_for_20_seconds(cstack: Stack) -> None:
    """The worst case of a hung node, every run: it leads MESSWERTE and the claims bucket, and
    both fused workers are connected to it. They must notice its silence (no socket closes),
    move to another node, and settle there who holds the claims, within 30 s."""
    cluster = _cluster(cstack)
    node = cluster.nodes[0]
    # Both workers connect to it first; they learn the other nodes from it, as clients do.
    cstack.extra_env["PIPELINE_NATS_URL"] = node.url
    address = f"127.0.0.1:{node.port}"

    async def worst(workers: Workers) -> NatsServer:
        await lead(cluster, node, ["MESSWERTE", "KV_pipeline_claims"])
        await until(
            lambda: asyncio.to_thread(
                lambda: all(w.nats_node() == address for w in workers.by_name.values())
            ),
            f"both workers connected to {node.server_name}",
        )
        return node

    def faults(workers: Workers) -> list[tuple[float, Fault]]:
        return [(0.2, killing_node(cstack, lambda: worst(workers), pause_s=20.0))]

    await run(cstack, "cluster: SIGSTOP for 20 s the node leading MESSWERTE and the claims, "
              "both workers on it", "fused", faults, failovers=1)  # fmt: skip


async def test_a_rolling_restart_of_all_three_nodes(cstack: Stack) -> None:
    cluster = _cluster(cstack)

    def restarting(node: NatsServer) -> Fault:
        async def fault() -> None:
            progress = cstack.progress()
            await progress.mark()
            await asyncio.to_thread(node.restart)  # SIGTERM, then the same store again
            await current(cluster, node)
            cstack.stalls.append(await progress.resumed(CARRIES_ON_S))

        return fault

    await run(cstack, "cluster: rolling restart of the three nodes", "fused",
              lambda _: [(0.15 + 0.25 * i, restarting(n)) for i, n in enumerate(cluster.nodes)],
              failovers=3)  # fmt: skip


async def test_sigkill_of_the_active_fused_worker(cstack: Stack) -> None:
    kill = killing_worker(cstack, "mqtt_bridge")
    await run(cstack, "cluster, fused ×2: SIGKILL the active worker", "fused",
              lambda w: [(0.3, kill(w))], failovers=1)  # fmt: skip


async def test_two_fused_workers_killed_in_turn(cstack: Stack) -> None:
    kill = killing_worker(cstack, "mqtt_bridge")
    await run(cstack, "cluster, fused ×2: both workers killed in turn", "fused",
              lambda w: [(0.2, kill(w)), (0.6, kill(w))], failovers=2)  # fmt: skip


async def test_split_replicas_killed_while_they_hold_or_share_the_work(cstack: Stack) -> None:
    """The active holder of each singleton, and one replica of each shared stage."""

    def sharing(workers: Workers, stage: str) -> Fault:
        async def fault() -> None:
            worker = workers[f"{stage}-1"]
            progress = cstack.progress()
            await progress.mark()
            worker.kill()
            cstack.stalls.append(await progress.resumed(CARRIES_ON_S))
            await restarted(worker)

        return fault

    def faults(w: Workers) -> list[tuple[float, Fault]]:
        singletons = ("mqtt_bridge", "validate", "dedupe", "publish")
        return [
            *[(0.1 + 0.12 * i, killing_worker(cstack, c)(w)) for i, c in enumerate(singletons)],
            (0.6, sharing(w, "persist")),
            (0.7, sharing(w, "window_aggregate")),
        ]

    await run(cstack, "cluster, split ×2: every singleton's holder and a shared replica killed",
              "split", faults, bess=False, failovers=1)  # fmt: skip
