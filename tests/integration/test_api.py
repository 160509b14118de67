"""The HTTP ingest API of design §12 against real servers: every status code, tokens made by the
CLI, meter readings with `quelle='API'`, BESS telemetry, `/api/last`, and a NATS outage during
which clients get 503 and their retries double nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from pipeline import tokens
from pipeline.config import Settings
from pipeline.devstack import NatsServer, free_port
from tests.conftest import eventually
from tests.integration.support import body, publish, running, stream_messages, topic

ORG_A = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
ORG_B = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
BASE = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
METER = "/api/zev/messwerte"
BESS = "/api/ingest"


@pytest.fixture
async def world(db: asyncpg.Connection) -> None:
    await db.executemany("INSERT INTO einheit VALUES ($1, $2)", [(1, ORG_A), (2, ORG_B)])
    await db.executemany(
        "INSERT INTO bess_device VALUES ($1, $2, $3)",
        [("site1", "bess1", ORG_A), ("site1", "bess2", ORG_A), ("site2", "bess1", ORG_B)],
    )


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_port": free_port(), "http_host": "127.0.0.1"})


@pytest.fixture
async def token(db: asyncpg.Connection) -> str:
    return await tokens.create(db, ORG_A, "gateway-a")


class Client:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def post(
        self, path: str, data: Any, token: str | None, **headers: str
    ) -> tuple[int, Any, Any]:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        sent = {"Content-Type": "application/json", **headers}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        async with self.session.post(self.base + path, data=raw, headers=sent) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.get(self.base + path, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def client(api_settings: Settings) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(session, api_settings.api_port)


def reading(unit: int, minutes: float, verbrauch: float = 1.5, **more: Any) -> dict[str, Any]:
    at = BASE + timedelta(minutes=minutes)
    return {"einheitId": unit, "timestamp": at.isoformat(), "verbrauch": verbrauch,
            "einspeisung": 0, **more}  # fmt: skip


def telemetry(
    site: str, device: str, seconds: float, p: float = 10.0, **more: Any
) -> dict[str, Any]:
    at = BASE + timedelta(seconds=seconds)
    return {"site": site, "device": device, "ts": at.isoformat(), "soc": 50.0, "p": p, **more}


def meters(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return list(items)


async def test_token_create_prints_it_once_on_the_last_line_and_stores_only_its_hash(
    database, db
) -> None:
    env = {**os.environ, "PIPELINE_DATABASE_URL": database, "PIPELINE_LOG_FORMAT": "json"}
    cli = [sys.executable, "-m", "pipeline", "token"]
    made = subprocess.run(
        [*cli, "create", "--org", str(ORG_A), "--name", "gw1"], env=env, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    secret = made.stdout.strip().splitlines()[-1]
    assert len(secret) >= 43  # 32 random bytes, URL-safe base64
    row = await db.fetchrow("SELECT * FROM api_token WHERE name = 'gw1'")
    assert row["organization_id"] == ORG_A
    assert row["token_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps({k: str(v) for k, v in dict(row).items()})
    again = subprocess.run(
        [*cli, "create", "--org", str(ORG_A), "--name", "gw1"], env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert again.returncode == 1
    listed = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True, check=True)
    assert "gw1" in listed.stdout
    assert str(ORG_A) in listed.stdout
    assert secret not in listed.stdout
    subprocess.run([*cli, "revoke", "gw1"], env=env, check=True, capture_output=True)
    assert await db.fetchval("SELECT revoked_at FROM api_token WHERE name = 'gw1'") is not None
    twice = subprocess.run([*cli, "revoke", "gw1"], env=env, capture_output=True, text=True)
    assert twice.returncode == 1


async def test_meter_readings_are_stored_with_quelle_api(
    api_settings, world, token, db, client
) -> None:
    async with running(api_settings):
        status, answer, _ = await client.post(
            METER, meters(reading(1, 1, 1.25), reading(1, 2, 0.75)), token
        )
        assert (status, answer) == (202, {"accepted": 2, "rejected": []})
        row = await eventually(
            lambda: db.fetchrow("SELECT verbrauch, quelle, anzahl_rohwerte FROM messwerte"),
            lambda r: r is not None and r["anzahl_rohwerte"] == 2,
        )
    assert (str(row["verbrauch"]), row["quelle"]) == ("2.0000", "API")
    sources = await db.fetch("SELECT DISTINCT quelle FROM zaehler_rohdaten")
    assert [r["quelle"] for r in sources] == ["API"]


async def test_an_interval_with_readings_from_mqtt_and_the_api_is_quelle_mqtt(
    api_settings, world, token, db, client, mqtt_broker
) -> None:
    async with running(api_settings):
        await publish(mqtt_broker.url, [(topic(ORG_A, 1), body(BASE + timedelta(minutes=20), 1))])
        status, _, _ = await client.post(METER, reading(1, 22), token)
        assert status == 202
        row = await eventually(
            lambda: db.fetchrow("SELECT quelle, anzahl_rohwerte FROM messwerte"),
            lambda r: r is not None and r["anzahl_rohwerte"] == 2,
        )
    assert row["quelle"] == "MQTT"


async def test_some_items_accepted_is_202_with_the_rejected_ones_listed_and_in_the_dlq(
    api_settings, world, token, db, client
) -> None:
    items = [reading(1, 3), {**reading(1, 4), "verbrauch": -1}, reading(99, 5), [1, 2]]
    async with running(api_settings):
        status, answer, _ = await client.post(METER, json.dumps(items).encode(), token)
        assert status == 202
        assert answer["accepted"] == 1
        assert [(r["index"], r["reason"]) for r in answer["rejected"]] == [
            (1, "negative_value"), (2, "unknown_unit"), (3, "not_an_object"),
        ]  # fmt: skip
        assert all(r["detail"] for r in answer["rejected"])
        dlq = await eventually(
            lambda: stream_messages(api_settings.nats_url, "DLQ"), lambda got: len(got) == 3
        )
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM zaehler_rohdaten"), lambda n: n == 1
        )
    entries = [json.loads(m.data) for m in dlq]
    assert {e["topic"] for e in entries} == {METER}
    assert sorted(m.subject for m in dlq) == [
        "dlq.negative_value", "dlq.not_an_object", "dlq.unknown_unit",
    ]  # fmt: skip


async def test_nothing_accepted_is_422_and_another_organizations_unit_is_403(
    api_settings, world, token, client
) -> None:
    async with running(api_settings):
        status, answer, _ = await client.post(METER, {"einheitId": 1, "verbrauch": 1}, token)
        assert status == 422
        assert answer["accepted"] == 0
        assert answer["rejected"][0]["reason"] == "missing_field"
        status, answer, _ = await client.post(METER, [reading(2, 1), reading(99, 1)], token)
        assert status == 403
        assert answer["rejected"][0]["reason"] == "organization_mismatch"
        status, answer, _ = await client.post(BESS, telemetry("site2", "bess1", 0), token)
        assert (status, answer["rejected"][0]["reason"]) == (403, "organization_mismatch")


@pytest.mark.parametrize(
    ("payload", "headers"),
    [
        (b"{not json", {}),
        (b"", {}),
        (b'"a string"', {}),
        (b"[]", {}),
        (json.dumps([reading(1, 1)] * 1001).encode(), {}),
        (b'{"einheitId": 1, "einheitId": 2}', {}),
    ],
    ids=["not-json", "empty", "string", "empty-array", "1001-items", "duplicate-keys"],
)
async def test_a_body_that_is_not_an_object_or_a_short_array_is_400(
    api_settings, world, token, client, payload, headers
) -> None:
    async with running(api_settings):
        status, answer, _ = await client.post(METER, payload, token, **headers)
    assert status == 400
    assert answer["error"]


async def test_tokens_missing_unknown_or_revoked_are_401_with_a_bearer_challenge(
    api_settings, world, token, db, client
) -> None:
    async with running(api_settings):
        for presented in (None, "not-a-token", ""):
            status, _, headers = await client.post(METER, reading(1, 1), presented)
            assert status == 401
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert (await client.post(METER, reading(1, 1), token))[0] == 202
        assert await tokens.revoke(db, "gateway-a")
        await eventually(
            lambda: client.post(METER, reading(1, 1), token),
            lambda r: r[0] == 401,
            timeout_s=5,
        )
        assert (await client.get("/api/last", token))[0] == 401


async def test_a_token_created_while_running_works_at_once_and_records_its_use(
    api_settings, world, db, client
) -> None:
    async with running(api_settings):
        await client.get("/api/last", "warm-the-cache")
        fresh = await tokens.create(db, ORG_A, "fresh")
        assert (await client.get("/api/last", fresh))[0] == 200
        await eventually(
            lambda: db.fetchval("SELECT last_used_at FROM api_token WHERE name = 'fresh'"),
            lambda at: at is not None,
            timeout_s=10,
        )


async def test_a_body_over_the_limit_is_413_and_a_wrong_content_type_415(
    api_settings, world, token, client
) -> None:
    small = api_settings.model_copy(update={"api_max_body_bytes": 2048})
    async with running(small):
        big = json.dumps([reading(1, i / 10) for i in range(40)]).encode()
        assert len(big) > 2048
        assert (await client.post(METER, big, token))[0] == 413
        status, _, _ = await client.post(METER, reading(1, 1), token, **{
            "Content-Type": "text/plain"})  # fmt: skip
        assert status == 415
        assert (await client.post(METER, reading(1, 1), token))[0] == 202


async def test_bess_telemetry_over_http_is_stored_computed_and_listed_newest_first(
    api_settings, world, token, db, client
) -> None:
    samples = [telemetry("site1", "bess1", s, p=-40.0, alarms=["FAN"] if s == 90 else [])
               for s in range(30, 330, 30)]  # fmt: skip
    samples.append(telemetry("site1", "bess2", 10, p=5.0, soh=97.0))
    async with running(api_settings):
        status, answer, _ = await client.post(BESS, samples, token)
        assert (status, answer["accepted"]) == (202, len(samples))
        await eventually(
            lambda: db.fetchval("SELECT samples FROM bess_interval WHERE device = 'bess1'"),
            lambda n: n == 10,
        )
        status, last = await client.get("/api/last?limit=3", token)
        assert status == 200
        assert [s["ts"] for s in last] == sorted((s["ts"] for s in last), reverse=True)
        assert len(last) == 3
        newest = last[0]
        assert newest["ts"] == (BASE + timedelta(seconds=300)).isoformat().replace("+00:00", "Z")
        assert (newest["site"], newest["device"], newest["quelle"]) == ("site1", "bess1", "API")
        assert (newest["p_ch"], newest["soh"], newest["alarms"]) == (None, None, [])
        _, only = await client.get("/api/last?device=bess2", token)
        assert [(s["device"], s["soh"]) for s in only] == [("bess2", 97.0)]
        _, every = await client.get("/api/last", token)
        assert len(every) == 10  # the default limit
        for bad in ("limit=0", "limit=1001", "limit=x", "site=a%20b"):
            assert (await client.get(f"/api/last?{bad}", token))[0] == 400
    charged = await db.fetchval(
        "SELECT energy_charged_kwh FROM bess_interval WHERE device = 'bess1'"
    )
    assert str(charged) == "3.0000"  # 40 kW for 270 s


async def test_a_bess_item_without_site_or_device_is_missing_field(
    api_settings, world, token, client
) -> None:
    async with running(api_settings):
        item = telemetry("site1", "bess1", 0)
        del item["device"]
        status, answer, _ = await client.post(BESS, item, token)
    assert (status, answer["rejected"][0]["reason"]) == (422, "missing_field")


async def test_healthz_answers_without_a_token_with_the_body_of_health(
    api_settings, world, client
) -> None:
    async with running(api_settings):
        # During start-up a component may still be coming up (503); then every one is up.
        status, health = await eventually(lambda: client.get("/healthz"), lambda r: r[0] == 200)
    assert status == 200
    assert health["status"] == "UP"
    assert "api" in health["components"]


async def test_while_nats_is_down_clients_get_503_and_their_retry_doubles_nothing(
    api_settings, world, token, db, client, nats_server: NatsServer
) -> None:
    items = meters(reading(1, 31, 2.5), reading(1, 32, 0.5))
    async with running(api_settings) as pipeline:
        assert (await client.post(METER, items, token))[0] == 202
        nats_server.stop()
        status, answer, headers = await client.post(METER, items, token)
        assert status == 503
        assert int(headers["Retry-After"]) > 0
        assert answer["error"]
        nats_server.restart()
        await eventually(
            lambda: client.post(METER, items, token), lambda r: r[0] == 202, timeout_s=30
        )
        row = await eventually(
            lambda: db.fetchrow("SELECT verbrauch, anzahl_rohwerte FROM messwerte"),
            lambda r: r is not None and r["anzahl_rohwerte"] == 2,
        )
        requests = pipeline.metrics.registry.get_sample_value(
            "pipeline_api_requests_total", {"path": METER, "status": "503"}
        )
    assert str(row["verbrauch"]) == "3.0000"
    assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 2
    assert requests == 1
