"""The broker and NATS configurations shipped in deploy/: valid, durable, and sized as their
comments say (a 10-minute pipeline outage at 1,000 msg/s loses nothing)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from pathlib import Path

import aiomqtt
import pytest

from pipeline.devstack import Mosquitto, mosquitto_binary, nats_server_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NATS_CONF = DEPLOY / "nats" / "nats.conf"
NATS_PASSWORDS = {
    "NATS_PIPELINE_PASSWORD": "p",
    "NATS_ORG_A_PASSWORD": "a",
    "NATS_ORG_B_PASSWORD": "b",
}
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
OUTAGE_MESSAGES = 10 * 60 * 1000
#: A meter payload and what mosquitto keeps per queued message besides, generously.
BYTES_PER_QUEUED_MESSAGE = 400


def mosquitto_settings() -> dict[str, str]:
    settings = {}
    for line in MOSQUITTO_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            settings[key] = value.strip()
    return settings


def test_shipped_nats_config_is_valid_and_syncs_every_write() -> None:
    check = subprocess.run(
        [nats_server_binary(), "-c", str(NATS_CONF), "-t"],
        capture_output=True,
        text=True,
        env={**os.environ, **NATS_PASSWORDS},
    )
    assert check.returncode == 0, check.stderr + check.stdout
    assert re.search(r"^\s*sync_interval:\s*always\s*$", NATS_CONF.read_text(), re.M)


def test_shipped_mosquitto_config_persists_and_queues_a_10_minute_outage() -> None:
    s = mosquitto_settings()
    assert s["persistence"] == "true"
    assert int(s["max_queued_messages"]) >= OUTAGE_MESSAGES
    assert int(s["max_queued_bytes"]) >= OUTAGE_MESSAGES * BYTES_PER_QUEUED_MESSAGE
    assert s["queue_qos0_messages"] == "false"
    assert s["allow_anonymous"] == "false"


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
async def test_shipped_mosquitto_config_keeps_the_bridges_queue_across_a_restart(
    tmp_path: Path,
) -> None:
    """The bridge's session is away while messages arrive and the broker restarts; all of them
    are delivered when it comes back. (Listener, paths and auth are rewritten for the test.)"""
    kept = [
        line
        for line in MOSQUITTO_CONF.read_text().splitlines()
        if not re.match(
            r"\s*(listener|persistence_location|password_file|acl_file|allow_anon)", line
        )
    ]
    broker = Mosquitto(tmp_path / "mosquitto", extra_config="\n".join(kept) + "\n")
    broker.start()
    try:
        session = f"bridge-{uuid.uuid4().hex[:6]}"
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier=session, clean_session=False
        ) as c:
            await c.subscribe("zev/+/+/messwert", qos=1)
        sent = 2000
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="meter") as meter:
            for i in range(sent):
                await meter.publish("zev/x/1/messwert", str(i).encode(), qos=1)
        broker.restart()
        got: set[int] = set()
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier=session, clean_session=False
        ) as c:
            async with asyncio.timeout(30):  # a lost message fails here, not at the suite's limit
                async for message in c.messages:
                    got.add(int(bytes(message.payload)))
                    if len(got) == sent:
                        break
        assert got == set(range(sent))
    finally:
        broker.stop()


ACL = DEPLOY / "mosquitto" / "acl"
ORG_A = "550e8400-e29b-41d4-a716-446655440000"
ORG_B = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def acl_broker(tmp_path: Path, users: dict[str, str]) -> Mosquitto:
    """A real mosquitto with the shipped ACL and a password file made as compose makes it."""
    passwords = tmp_path / "passwords"
    for user, password in users.items():
        subprocess.run(
            ["mosquitto_passwd", "-b", *(["-c"] if not passwords.exists() else []),
             str(passwords), user, password],
            check=True, capture_output=True,
        )  # fmt: skip
    passwords.chmod(0o644)
    return Mosquitto(
        tmp_path / "mosquitto",
        anonymous=False,
        extra_config=f"password_file {passwords}\nacl_file {ACL}\n",
    ).start()


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
async def test_shipped_acl_lets_an_organisation_publish_only_under_its_own_id(
    tmp_path: Path,
) -> None:
    """A real mosquitto with the shipped ACL and a password file made like the compose file
    makes it: org A's user publishes to its own topic and to org B's; the bridge's user, reading
    everything, gets A's own reading only. Nobody gets in without a password."""
    broker = acl_broker(tmp_path, {"messwerte-bridge": "b-secret", ORG_A: "a-secret"})
    try:
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, username="messwerte-bridge", password="b-secret"
        ) as bridge:
            await bridge.subscribe("zev/+/+/messwert", qos=1)
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username=ORG_A, password="a-secret"
            ) as org_a:
                await org_a.publish(f"zev/{ORG_B}/7/messwert", b"not yours", qos=1)
                await org_a.publish(f"zev/{ORG_A}/1/messwert", b"own", qos=1)
            async with asyncio.timeout(10):
                message = await anext(bridge.messages)
            # The broker keeps order per publisher: had B's topic passed, it would come first.
            assert (message.topic.value, message.payload) == (f"zev/{ORG_A}/1/messwert", b"own")
        attempts: list[tuple[str | None, str | None]] = [(None, None), (ORG_A, "wrong")]
        for login, secret in attempts:
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client(
                    "127.0.0.1", broker.port, username=login, password=secret
                ):
                    pass
    finally:
        broker.stop()


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
async def test_shipped_acl_lets_a_bess_site_publish_only_its_own_telemetry(
    tmp_path: Path,
) -> None:
    """Site 1's user publishes to site 2's topic and to its own; the bridge gets its own only."""
    broker = acl_broker(tmp_path, {"messwerte-bridge": "b-secret", "site1": "s-secret"})
    try:
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, username="messwerte-bridge", password="b-secret"
        ) as bridge:
            await bridge.subscribe([("zev/+/+/messwert", 1), ("bess/+/+/telemetry", 1)])
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username="site1", password="s-secret"
            ) as site:
                await site.publish("bess/site2/bess1/telemetry", b"not yours", qos=1)
                await site.publish(f"zev/{ORG_A}/1/messwert", b"not a meter", qos=1)
                await site.publish("bess/site1/bess1/telemetry", b"own", qos=1)
            async with asyncio.timeout(10):
                message = await anext(bridge.messages)
            assert (message.topic.value, message.payload) == ("bess/site1/bess1/telemetry", b"own")
    finally:
        broker.stop()
