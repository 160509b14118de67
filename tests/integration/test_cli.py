"""The console script as operators run it: `pipeline migrate`, `pipeline run`, `pipeline demo`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from pipeline.devstack import free_port
from tests.conftest import eventually
from tests.integration.support import body, publish, topic

PIPELINE = [sys.executable, "-m", "pipeline"]


def env(**values: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    base.update({f"PIPELINE_{k.upper()}": v for k, v in values.items()})
    base["PIPELINE_LOG_FORMAT"] = "json"
    base.setdefault("PIPELINE_API_PORT", "0")
    return base


async def test_migrate_creates_the_schema(postgres_server) -> None:
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_server.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        for _ in range(2):  # idempotent
            done = subprocess.run(
                [*PIPELINE, "migrate"],
                env=env(database_url=postgres_server.dsn_for(name)),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
        conn = await asyncpg.connect(postgres_server.dsn_for(name))
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        await conn.close()
        assert {"einheit", "zaehler_rohdaten", "messwerte"} <= tables
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_run_processes_readings_and_exits_0_on_sigterm(
    database, nats_server, mqtt_broker, db, tmp_path: Path
) -> None:
    org = uuid.uuid4()
    await db.execute("INSERT INTO einheit VALUES (5, $1)", org)
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [*PIPELINE, "run"],
        env=env(
            mqtt_url=mqtt_broker.url,
            nats_url=nats_server.url,
            database_url=database,
            window_grace_seconds="5",
            http_port=str(free_port()),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        at = datetime.now(UTC) - timedelta(hours=1)
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM pipeline_schema_migrations"), lambda n: n >= 1
        )
        await eventually(
            lambda: publish(mqtt_broker.url, []),
            lambda _: "MQTT subscribed" in (tmp_path / "run.log").read_text(),
        )
        await publish(mqtt_broker.url, [(topic(org, 5), body(at, "1.25"))])
        await eventually(
            lambda: db.fetchval("SELECT verbrauch FROM messwerte"),
            lambda v: v is not None,
            timeout_s=30,
        )
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_demo_ends_with_its_summary_and_leaves_no_process_behind(tmp_path: Path) -> None:
    done = subprocess.run(
        [*PIPELINE, "demo", "--duration", "20"],
        env=env(http_port="0", api_port=str(free_port())),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    pattern = (
        r"demo: (\d+) readings, (\d+) messwerte published, "
        r"(\d+) bess samples, (\d+) bess intervals published"
    )
    match = re.fullmatch(pattern, last)
    assert match, last
    readings, published, samples, intervals = (int(g) for g in match.groups())
    # Two hours of backfill, a reading a minute for each of 40 MQTT and 5 gateway units.
    assert readings >= 45 * 120
    assert published >= 45 * 8  # at least one message per closed quarter hour and unit
    assert samples >= 3 * 240  # three batteries, a sample every 30 s for two hours
    assert intervals >= 3 * 8
    assert _processes_mentioning("messwerte-demo-") == []


def test_demo_on_a_cluster_shows_one_worker_active_and_the_other_standing_by() -> None:
    done = subprocess.run(
        [*PIPELINE, "demo", "--cluster", "--duration", "20"],
        env=env(http_port="0", api_port=str(free_port())),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    views = [line for line in lines if line.startswith("[")]
    assert views, lines
    # Each view line names both workers' roles: one holds every singleton, one stands by.
    assert re.search(r"worker \d: active \(dedupe, .*validate_bess\)", views[-1]), views[-1]
    assert re.search(r"worker \d: standby", views[-1]), views[-1]
    match = re.search(r"demo: (\d+) readings, (\d+) messwerte published", lines[-1])
    assert match, lines[-1]
    assert int(match.group(1)) >= 45 * 120
    assert int(match.group(2)) >= 45 * 8
    assert _processes_mentioning("messwerte-demo-") == []


def prune_cli(database: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PIPELINE, "prune", *args],
        env=env(database_url=database, **settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def old_processed_rows(db: asyncpg.Connection, count: int) -> None:
    """Raw rows of 40 days ago, summed (`verarbeitet`), as a pipeline leaves them."""
    org = uuid.uuid4()
    await db.execute("INSERT INTO einheit (id, organization_id) VALUES (1, $1)", org)
    start = (datetime.now(UTC) - timedelta(days=40)).replace(minute=0, second=0, microsecond=0)
    await db.executemany(
        "INSERT INTO zaehler_rohdaten (einheit_id, organization_id, timestamp, verbrauch, "
        "einspeisung, verarbeitet, verarbeitet_am) VALUES (1, $1, $2, 1, 0, TRUE, NOW())",
        [(org, start + timedelta(minutes=m)) for m in range(count)],
    )


async def test_prune_dry_run_counts_and_changes_nothing_then_prune_deletes(database, db) -> None:
    await old_processed_rows(db, 30)
    dry = prune_cli(database, "--dry-run", raw_retention_days="30")
    assert dry.returncode == 0, dry.stderr
    assert "zaehler_rohdaten: would delete 30 processed rows" in dry.stdout
    assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 30
    done = prune_cli(database, raw_retention_days="30")
    assert done.returncode == 0, done.stderr
    assert "zaehler_rohdaten: deleted 30 processed rows" in done.stdout
    assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 0


async def test_prune_without_a_retention_deletes_nothing_and_says_why(database, db) -> None:
    await old_processed_rows(db, 3)
    done = prune_cli(database)
    assert done.returncode == 2
    assert "PIPELINE_RAW_RETENTION_DAYS is not set" in done.stderr
    assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 3
