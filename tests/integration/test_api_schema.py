"""Property: for any input schemathesis derives from the committed OpenAPI document, a running
ingest API (`pipeline run --stage http_ingest`, a real process on real servers) answers
without a 5xx, with a status code the document lists, and a body and headers it describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

from pipeline.devstack import free_port

ROOT = Path(__file__).resolve().parents[2]
ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
SCHEMA = schemathesis.openapi.from_path(ROOT / "schemas" / "openapi.json")
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A running API of its own (module scope: hypothesis calls the test many times)."""
    import asyncio

    import asyncpg

    from pipeline.devstack import NatsServer, Postgres
    from pipeline.migrations import migrate
    from pipeline.tokens import create

    tmp = tmp_path_factory.mktemp("api-schema")
    postgres = Postgres(tmp / "pg", fsync=False).start()
    nats = NatsServer(tmp / "nats").start()

    async def prepare() -> str:
        await migrate(postgres.dsn)
        db = await asyncpg.connect(postgres.dsn)
        try:
            await db.executemany("INSERT INTO einheit VALUES ($1, $2)", [(1, ORG), (2, ORG)])
            await db.execute("INSERT INTO bess_device VALUES ('site1', 'bess1', $1)", ORG)
            return await create(db, ORG, "schemathesis")
        finally:
            await db.close()

    token = asyncio.run(prepare())
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "PIPELINE_DATABASE_URL": postgres.dsn,
        "PIPELINE_NATS_URL": nats.url,
        "PIPELINE_API_PORT": str(port),
        "PIPELINE_HTTP_PORT": str(http_port),
        "PIPELINE_HTTP_HOST": "127.0.0.1",
        "PIPELINE_API_MAX_BODY_BYTES": "65536",
        "PIPELINE_LOG_FORMAT": "json",
        "PIPELINE_LOG_LEVEL": "error",
    }
    log = (tmp / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--mode", "split", "--stage", "http_ingest"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp / "api.log").read_text()
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.1)
        yield base, token
    finally:
        proc.terminate()
        proc.wait(15)
        nats.stop()
        postgres.stop()


@SCHEMA.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_any_request_gets_a_documented_answer_and_never_a_5xx(
    case: Any, api: tuple[str, str]
) -> None:
    base, token = api
    case.call_and_validate(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS
    )


def test_the_document_lists_every_status_code_the_contract_names() -> None:
    document = json.loads((ROOT / "schemas" / "openapi.json").read_text())
    for path in ("/api/zev/messwerte", "/api/ingest"):
        codes = set(document["paths"][path]["post"]["responses"])
        assert codes == {"202", "400", "401", "403", "413", "415", "422", "503"}
    assert document["openapi"].startswith("3.1")
