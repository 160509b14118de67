"""HTTP surface (design §9): metrics with the contract's names, health, and the /actuator aliases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from pipeline.config import Settings
from pipeline.devstack import free_port
from tests.conftest import eventually, use_mosquitto
from tests.integration.support import body, publish, running, topic

ORG = uuid.uuid4()
CONTRACT_METRICS = [
    "zev_mqtt_messages_received_total",
    "zev_mqtt_messages_processed_total",
    "zev_mqtt_messages_failed_total",
    "zev_mqtt_last_message_timestamp",
    "zev_aggregation_runs_total",
    "zev_aggregation_records_processed_total",
    "zev_aggregation_duration_seconds_bucket",
    "zev_aggregation_last_run_timestamp",
    "pipeline_stage_messages_in_total",
    "pipeline_stage_batch_seconds_bucket",
    "pipeline_consumer_pending_messages",
    "pipeline_retry_queue_depth",
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"http_port": free_port(), "http_host": "127.0.0.1"})


async def get(settings: Settings, path: str) -> tuple[int, str, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{settings.http_port}{path}") as resp,
    ):
        text = await resp.text()
        return (
            resp.status,
            text,
            (await resp.json() if resp.content_type == "application/json" else {}),
        )


async def test_metrics_carry_every_contract_name_on_both_paths(settings, db, mqtt_broker) -> None:
    await db.execute("INSERT INTO einheit VALUES (1, $1)", ORG)
    async with running(settings):
        await publish(
            mqtt_broker.url,
            [
                (topic(ORG, 1), body(datetime.now(UTC) - timedelta(hours=1), "1")),
                (topic(ORG, 1), b"x"),
            ],
        )
        await eventually(
            lambda: get(settings, "/metrics"),
            lambda r: "zev_mqtt_messages_failed_total 1.0" in r[1],
        )
        status, text, _ = await get(settings, "/metrics")
        alias_status, alias_text, _ = await get(settings, "/actuator/prometheus")
    assert status == alias_status == 200
    for name in CONTRACT_METRICS:
        assert name in text, name
        assert name in alias_text, name
    assert "zev_mqtt_messages_received_total 2.0" in text
    assert "zev_mqtt_messages_processed_total 1.0" in text


async def test_health_is_up_with_every_component_listed(settings) -> None:
    async with running(settings):
        _status, _, health = await eventually(
            lambda: get(settings, "/health"), lambda r: r[0] == 200
        )
        alias_status, _, _ = await get(settings, "/actuator/health")
    assert alias_status == 200
    assert health["status"] == "UP"
    assert {"nats", "database", "mqtt", "aggregation", "publish"} <= set(health["components"])


async def test_mqtt_health_reports_subscription_and_silence(settings, mqtt_broker) -> None:
    async with running(settings):
        _status, _, mqtt = await eventually(
            lambda: get(settings, "/health/mqtt"), lambda r: r[0] == 200
        )
        assert mqtt["subscribed"] is True
        assert mqtt["seconds_since_last_message"] is None
        assert mqtt["protocol"] == ("5" if use_mosquitto() else "3.1.1")
        await publish(mqtt_broker.url, [(topic(ORG, 1), b"{}")])
        _, _, mqtt = await eventually(
            lambda: get(settings, "/actuator/health/mqtt"),
            lambda r: r[2]["seconds_since_last_message"] is not None,
        )
    assert mqtt["seconds_since_last_message"] >= 0


async def test_mqtt_health_shows_the_broker_gone_and_the_reconnect(settings, mqtt_broker) -> None:
    broker = mqtt_broker.process
    async with running(settings):
        await eventually(lambda: get(settings, "/health/mqtt"), lambda r: r[0] == 200)
        broker.stop()
        _, _, down = await eventually(
            lambda: get(settings, "/health/mqtt"), lambda r: r[0] == 503, timeout_s=60
        )
        assert (down["connected"], down["subscribed"]) == (False, False)
        assert down["last_error"]
        broker.restart()
        _, _, up = await eventually(
            lambda: get(settings, "/health/mqtt"), lambda r: r[0] == 200, timeout_s=30
        )
    assert up["reconnects"] >= 1
    assert up["last_error"] is None


async def test_long_silence_turns_mqtt_health_503_when_opted_in(settings) -> None:
    settings = settings.model_copy(update={"mqtt_silence_threshold_seconds": 0.5})
    async with running(settings):
        _status, _, mqtt = await eventually(
            lambda: get(settings, "/health/mqtt"), lambda r: r[0] == 503 and r[2]["subscribed"]
        )
    assert mqtt["subscribed"] is True


async def test_aggregation_health_reports_the_last_run(settings) -> None:
    async with running(settings):
        status, _, agg = await eventually(
            lambda: get(settings, "/health/aggregation"), lambda r: r[2].get("last_run") is not None
        )
        alias_status, _, _ = await get(settings, "/actuator/health/aggregation")
    assert status == alias_status == 200
    assert agg["outcome"] == "success"
    assert {"intervals", "rows"} <= set(agg)


async def test_mqtt_health_on_a_worker_without_the_bridge_is_404(settings) -> None:
    async with running(settings, stages=["validate"]):
        status, _, body_ = await get(settings, "/health/mqtt")
    assert status == 404
    assert body_["status"] == "UNKNOWN"
