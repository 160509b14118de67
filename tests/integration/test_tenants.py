"""Tenant isolation on the output (deploy/nats/tenants.conf) against a real nats-server: an
organization reads its own `messwerte.{org}.>`, live and replayed from JetStream, and nothing of
another organization's, by any of the ways NATS offers."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.js.api import ConsumerConfig

from pipeline.broker import declare_streams
from pipeline.devstack import NatsServer
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]
ORG_A = "550e8400-e29b-41d4-a716-446655440000"
ORG_B = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
PASSWORDS = {
    "NATS_PIPELINE_PASSWORD": "pipeline-secret",
    "NATS_ORG_A_PASSWORD": "a-secret",
    "NATS_ORG_B_PASSWORD": "b-secret",
}


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    for name, value in PASSWORDS.items():  # nats-server reads them from its environment
        monkeypatch.setenv(name, value)
    node = NatsServer(tmp_path / "nats")
    shutil.copy(ROOT / "deploy" / "nats" / "tenants.conf", node.workdir / "tenants.conf")
    node.extra_config = 'include "tenants.conf"\n'
    node.start()
    yield node
    node.stop()


def url(server: NatsServer, user: str, password: str) -> str:
    return f"nats://{user}:{password}@127.0.0.1:{server.port}"


@pytest.fixture
async def published(server: NatsServer) -> AsyncIterator[None]:
    """The pipeline's streams, with one interval of each organization on MESSWERTE."""
    nc = await nats.connect(url(server, "pipeline", PASSWORDS["NATS_PIPELINE_PASSWORD"]))
    js = nc.jetstream()
    await declare_streams(js)
    for org in (ORG_A, ORG_B):
        await js.publish(f"messwerte.{org}.1", f'{{"org": "{org}"}}'.encode())
    yield
    await nc.close()


class Tenant:
    """A connection as one organization, keeping the errors the server sends it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def connect(self, server: NatsServer, org: str, password: str) -> Tenant:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            url(server, org, password), inbox_prefix=f"_INBOX_{org}", error_cb=on_error
        )
        return self

    async def denied(self) -> bool:
        return any("permissions violation" in e.lower() for e in self.errors)


@pytest.fixture
async def org_a(server: NatsServer, published: None) -> AsyncIterator[Tenant]:
    tenant = await Tenant().connect(server, ORG_A, PASSWORDS["NATS_ORG_A_PASSWORD"])
    yield tenant
    await tenant.nc.close()


async def test_an_organization_replays_its_own_intervals_from_jetstream(org_a: Tenant) -> None:
    js = org_a.nc.jetstream()
    await js.add_consumer(
        "MESSWERTE",
        ConsumerConfig(name=ORG_A, durable_name=ORG_A, filter_subject=f"messwerte.{ORG_A}.>"),
    )
    sub = await js.pull_subscribe_bind(ORG_A, "MESSWERTE", inbox_prefix=f"_INBOX_{ORG_A}.".encode())
    msgs = await sub.fetch(10, timeout=5)
    assert [m.subject for m in msgs] == [f"messwerte.{ORG_A}.1"]
    await msgs[0].ack()


async def test_an_organization_cannot_make_a_consumer_of_another_ones_subjects(
    org_a: Tenant,
) -> None:
    js = org_a.nc.jetstream(timeout=2)
    config = ConsumerConfig(name=ORG_A, durable_name=ORG_A, filter_subject=f"messwerte.{ORG_B}.>")
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)):
        await js.add_consumer("MESSWERTE", config)
    await eventually(org_a.denied, bool, timeout_s=5)


async def test_an_organization_cannot_subscribe_to_another_ones_subjects(
    server: NatsServer, org_a: Tenant
) -> None:
    got: list[str] = []

    async def collect(msg: Any) -> None:
        got.append(msg.subject)

    await org_a.nc.subscribe(f"messwerte.{ORG_B}.>", cb=collect)
    await eventually(org_a.denied, bool, timeout_s=5)
    pipeline = await nats.connect(url(server, "pipeline", PASSWORDS["NATS_PIPELINE_PASSWORD"]))
    await pipeline.publish(f"messwerte.{ORG_B}.2", b"{}")
    await pipeline.flush()
    await pipeline.close()
    await org_a.nc.flush()  # a message it could read would have arrived before this returns
    assert got == []


async def test_an_organization_cannot_read_messages_by_sequence_or_snoop_inboxes(
    org_a: Tenant,
) -> None:
    js = org_a.nc.jetstream(timeout=2)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)):
        await js.get_msg("MESSWERTE", seq=2)
    await org_a.nc.subscribe("_INBOX.>")
    await eventually(
        lambda: asyncio.sleep(0, result=[e.lower() for e in org_a.errors]),
        lambda errors: any('subscription to "_inbox.>"' in e for e in errors),
    )
