"""The bridge's MQTT client against real brokers (mosquitto, or nats-server's MQTT listener):
QoS 1 with PUBACKs held until the caller acknowledges, a session that outlives the connection,
flow control that keeps a backlog at the broker, and MQTT 3.1.1 where a broker lacks 5."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
import trustme
import uvloop

from pipeline.config import MqttTarget
from pipeline.devstack import NatsServer
from pipeline.mqtt_session import Message, MqttError, Refused, Session
from tests.conftest import eventually, use_mosquitto
from tests.integration.support import publish, running

LIMIT = 100
COUNT = 3000


async def connect(url: str, client_id: str, *, mqtt5: bool, **options: int) -> Session:
    session = await Session.connect(MqttTarget(url), client_id, mqtt5_=mqtt5, **options)
    await session.subscribe(["t/#"])
    return session


async def receive(session: Session, count: int, *, ack: bool = True) -> list[Message]:
    """Take `count` messages as they come (acknowledging each batch unless told not to)."""
    seen: list[Message] = []
    deadline = time.monotonic() + 60
    while len(seen) < count and time.monotonic() < deadline:
        await asyncio.wait_for(session.ready(), 30)
        batch = session.take(count - len(seen))
        if ack:
            session.ack(batch)
        seen.extend(batch)
    return seen


#: Whether the test broker speaks MQTT 5 (mosquitto does, nats-server's MQTT listener does not).
MQTT5 = use_mosquitto()
#: MQTT 5 where the test broker speaks it, 3.1.1 everywhere.
PROTOCOLS = [True, False] if MQTT5 else [False]


@pytest.mark.parametrize("mqtt5", PROTOCOLS, ids=lambda v: "mqtt5" if v else "mqtt311")
async def test_reading_pauses_at_the_limit_and_every_message_arrives_in_order(
    mqtt_broker, mqtt5: bool
) -> None:
    client_id = f"limit-{uuid.uuid4().hex[:6]}"
    session = await connect(mqtt_broker.url, client_id, mqtt5=mqtt5, limit=LIMIT)
    try:
        await publish(mqtt_broker.url, [("t/x", f"m{i}") for i in range(COUNT)])

        async def paused() -> bool:
            return not session.reading

        await eventually(paused, bool)  # nothing taken yet: the queue is full, reading stopped
        assert session.queued() == LIMIT
        seen: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(seen) < COUNT and time.monotonic() < deadline:
            await asyncio.wait_for(session.ready(), 30)
            batch = session.take(7)
            session.ack(batch)
            seen.extend(m.payload for m in batch)
            assert session.queued() <= LIMIT
    finally:
        await session.close()
    assert seen == [f"m{i}".encode() for i in range(COUNT)]
    assert session.pauses > 1


async def test_unacknowledged_messages_come_again_after_a_reconnect_and_acknowledged_ones_do_not(
    mqtt_broker, nats_server
) -> None:
    """The session outlives the connection (same client id, no clean start): what was taken
    but never acknowledged is sent again, nothing acknowledged is, and what was published
    while no one was connected waits for the next connection."""
    mqtt5 = MQTT5
    client_id = f"held-{uuid.uuid4().hex[:6]}"
    first = await connect(mqtt_broker.url, client_id, mqtt5=mqtt5)
    await publish(mqtt_broker.url, [("t/x", f"m{i}") for i in range(20)])
    acked = await receive(first, 10)
    held = await receive(first, 10, ack=False)
    assert [m.payload for m in acked + held] == [f"m{i}".encode() for i in range(20)]
    first.abort()  # a crash: no DISCONNECT
    await publish(mqtt_broker.url, [("t/x", f"n{i}") for i in range(5)])

    second = await connect(mqtt_broker.url, client_id, mqtt5=mqtt5)
    try:
        assert second.session_present
        again = await receive(second, 15)
    finally:
        await second.close()
    # mosquitto sends the held ones first; nats-server's listener after its ack_wait (30 s).
    assert sorted(m.payload for m in again) == sorted(
        [f"m{i}".encode() for i in range(10, 20)] + [f"n{i}".encode() for i in range(5)]
    )


@pytest.mark.parametrize("mqtt5", PROTOCOLS, ids=lambda v: "mqtt5" if v else "mqtt311")
async def test_a_session_resuming_with_a_backlog_past_its_limit_subscribes_and_drains_it(
    mqtt_broker, mqtt5: bool
) -> None:
    """A standby taking over after a crash under load: the broker sends the queued messages
    right after CONNACK, more than the limit, and the SUBACK behind them must still be read
    (it was left unparsed behind a full queue, and every takeover timed out)."""
    client_id = f"backlog-{uuid.uuid4().hex[:6]}"
    first = await connect(mqtt_broker.url, client_id, mqtt5=mqtt5)
    first.abort()  # gone, its session kept
    await publish(mqtt_broker.url, [("t/x", f"m{i}") for i in range(LIMIT * 5)])
    second = await connect(mqtt_broker.url, client_id, mqtt5=mqtt5, limit=LIMIT)
    try:
        seen = await receive(second, LIMIT * 5)
    finally:
        await second.close()
    assert sorted(m.payload for m in seen) == sorted(f"m{i}".encode() for i in range(LIMIT * 5))


async def test_an_mqtt5_connect_to_a_broker_without_5_is_refused_as_such(tmp_path: Path) -> None:
    """nats-server's MQTT listener answers an MQTT 5 CONNECT as a 3.1.1 broker: the bridge
    learns from `no_mqtt5` to connect with 3.1.1, which then works."""
    nats_server = NatsServer(tmp_path / "nats", mqtt=True).start()
    try:
        await _no_mqtt5_then_311(nats_server.mqtt_url)
    finally:
        nats_server.stop()


async def _no_mqtt5_then_311(url: str) -> None:
    with pytest.raises(Refused) as refused:
        await Session.connect(MqttTarget(url), "five", mqtt5_=True)
    assert refused.value.no_mqtt5
    session = await connect(url, "five", mqtt5=False)
    try:
        await publish(url, [("t/y", "hello")])
        [message] = await receive(session, 1)
    finally:
        await session.close()
    assert (message.topic, message.payload) == ("t/y", b"hello")


async def test_a_large_payload_split_over_many_reads_arrives_whole(mqtt_broker) -> None:
    session = await connect(mqtt_broker.url, f"big-{uuid.uuid4().hex[:6]}", mqtt5=MQTT5)
    big = bytes(range(256)) * 2000  # 512 KB, far more than one socket read
    try:
        await publish(mqtt_broker.url, [("t/small", b"a"), ("t/big", big), ("t/small", b"b")])
        seen = await receive(session, 3)
    finally:
        await session.close()
    assert [(m.topic, m.payload) for m in seen] == [
        ("t/small", b"a"),
        ("t/big", big),
        ("t/small", b"b"),
    ]


async def test_a_small_receive_maximum_loses_no_reading(settings, db, mqtt_broker) -> None:
    """PIPELINE_MQTT_RECEIVE_MAXIMUM=20 (the intake pauses at 20 queued): a burst 150 times
    larger is stored in full."""
    org = uuid.uuid4()
    await db.execute("INSERT INTO einheit (id, organization_id) VALUES (77, $1)", org)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    burst = [
        (
            f"zev/{org}/77/messwert",
            f'{{"timestamp": "{(base + timedelta(minutes=i)).isoformat()}", '
            f'"verbrauch": {i % 97 / 100}, "einspeisung": 0}}',
        )
        for i in range(COUNT)
    ]
    small = settings.model_copy(update={"mqtt_receive_maximum": 20})
    async with running(small):
        await publish(mqtt_broker.url, burst)

        async def stored() -> int:
            return int(await db.fetchval("SELECT count(*) FROM zaehler_rohdaten"))

        await eventually(stored, lambda n: n == COUNT, timeout_s=60)


def test_a_session_works_on_uvloop_as_in_a_worker(mqtt_broker) -> None:
    """Workers run on uvloop, whose transports are not asyncio's classes."""

    async def roundtrip() -> list[bytes]:
        session = await connect(mqtt_broker.url, f"uv-{uuid.uuid4().hex[:6]}", mqtt5=MQTT5)
        try:
            await publish(mqtt_broker.url, [("t/uv", f"u{i}") for i in range(50)])
            return [m.payload for m in await receive(session, 50)]
        finally:
            await session.close()

    assert uvloop.run(roundtrip()) == [f"u{i}".encode() for i in range(50)]


@pytest.fixture
def secured_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    """nats-server's MQTT listener over TLS (a certificate of a CA made for the test, trusted
    through SSL_CERT_FILE as an operator's CA would be) that requires a user and password."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    server = NatsServer(tmp_path / "nats", mqtt=True)
    server.mqtt_options = (
        f'  tls {{\n    cert_file: "{cert}"\n    key_file: "{key}"\n  }}\n'
        '  authorization {\n    username: "meter"\n    password: "s3cr/t"\n  }\n'
    )
    yield server.start()
    server.stop()


async def test_tls_with_a_user_and_password_connects_and_receives(secured_broker) -> None:
    url = f"mqtts://meter:s3cr%2Ft@127.0.0.1:{secured_broker.mqtt_port}"
    session = await connect(url, "tls-client", mqtt5=False)
    try:
        async with aiomqtt.Client(
            "127.0.0.1",
            secured_broker.mqtt_port,
            username="meter",
            password="s3cr/t",
            tls_context=ssl.create_default_context(),
        ) as publisher:
            await publisher.publish("t/tls", b"over tls", qos=1)
        [message] = await receive(session, 1)
    finally:
        await session.close()
    assert (message.topic, message.payload) == ("t/tls", b"over tls")


async def test_a_wrong_password_is_refused_with_the_brokers_code(secured_broker) -> None:
    url = f"mqtts://meter:wrong@127.0.0.1:{secured_broker.mqtt_port}"
    with pytest.raises(Refused) as refused:
        await Session.connect(MqttTarget(url), "tls-client", mqtt5_=False)
    assert refused.value.code in (4, 5)  # 3.1.1: bad user name or password, not authorized
    assert not refused.value.no_mqtt5


async def test_a_plain_connection_to_a_tls_listener_fails_instead_of_hanging(
    secured_broker,
) -> None:
    url = f"mqtt://meter:s3cr%2Ft@127.0.0.1:{secured_broker.mqtt_port}"
    with pytest.raises(MqttError):
        await asyncio.wait_for(Session.connect(MqttTarget(url), "plain-client", mqtt5_=False), 30)


async def test_a_broker_that_stops_answering_ends_the_session_after_one_and_a_half_keepalives(
    tmp_path: Path,
) -> None:
    """SIGSTOP of the broker: no RST, no FIN, only silence. The session's PINGREQs go
    unanswered and it ends with the reason, so the bridge reconnects instead of waiting."""
    server = NatsServer(tmp_path / "nats", mqtt=True).start()
    try:
        session = await connect(server.mqtt_url, "keepalive", mqtt5=False, keepalive_s=1)
        server.pause()
        with pytest.raises(MqttError, match="nothing from the broker"):
            await asyncio.wait_for(session.ready(), 10)
    finally:
        server.resume()
        server.stop()
