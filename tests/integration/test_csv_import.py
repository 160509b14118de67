"""`pipeline import-csv`: CSV readings take the MQTT path and mark their intervals `quelle='CSV'`."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from pipeline.csv_import import import_csv
from tests.conftest import eventually
from tests.integration.support import body, publish, running, stream_messages, topic

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
END = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=15, second=0, microsecond=0)


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("einheit_id,timestamp,verbrauch,einspeisung\n" + "\n".join(rows) + "\n")
    return path


async def test_csv_rows_are_stored_and_aggregated_as_csv(
    settings, db, mqtt_broker, tmp_path
) -> None:
    await db.executemany("INSERT INTO einheit VALUES ($1, $2)", [(1, ORG), (2, ORG)])
    csv_rows = [
        f"1,{(END - timedelta(minutes=10)).isoformat()},1.5,0.25",
        f"1,{(END - timedelta(minutes=5)).isoformat()},2,0",
        f"2,{(END - timedelta(minutes=5)).isoformat()},1,0",
        f"1,{(END - timedelta(minutes=4)).isoformat()},abc,0",  # invalid number
        f"99,{(END - timedelta(minutes=4)).isoformat()},1,0",  # unknown unit
        f"1,{(END - timedelta(minutes=3)).replace(tzinfo=None).isoformat()},1,0",  # no offset
    ]
    async with running(settings):
        await publish(mqtt_broker.url, [(topic(ORG, 2), body(END - timedelta(minutes=1), "1"))])
        summary = await import_csv(
            settings, write_csv(tmp_path / "in.csv", csv_rows), progress=None
        )
        rows = await eventually(
            lambda: db.fetch(
                "SELECT einheit_id, quelle, verbrauch FROM messwerte ORDER BY einheit_id"
            ),
            lambda r: len(r) == 2 and r[1]["verbrauch"] == 2,
        )
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"), lambda got: len(got) == 3
        )
    assert (summary.rows, summary.accepted, dict(summary.rejected)) == (
        6,
        3,
        {"invalid_number": 1, "unknown_unit": 1, "invalid_timestamp": 1},
    )
    assert [(r["einheit_id"], r["quelle"], r["verbrauch"]) for r in rows] == [
        (1, "CSV", Decimal("3.5000")),
        (2, "MQTT", Decimal("2.0000")),  # one CSV row and one MQTT row: MQTT
    ]
    assert sorted(m.subject for m in dlq) == [
        "dlq.invalid_number",
        "dlq.invalid_timestamp",
        "dlq.unknown_unit",
    ]
    assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten WHERE quelle = 'CSV'") == 3


def test_cli_refuses_a_file_without_the_required_header(settings, tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("unit,time\n1,2\n")
    env = {
        "PIPELINE_DATABASE_URL": settings.database_url,
        "PIPELINE_NATS_URL": settings.nats_url,
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "import-csv", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "einheit_id" in done.stderr


async def test_import_shows_a_progress_bar_and_sums_up_accepted_and_rejected_rows(
    settings, db, tmp_path
) -> None:
    await db.execute("INSERT INTO einheit VALUES ($1, $2)", 1, ORG)
    rows = [f"1,{(END - timedelta(minutes=m)).isoformat()},1,0" for m in range(1, 1201)]
    rows += [f"1,{END.isoformat()},-1,0", f"77,{END.isoformat()},1,0"]
    progress = io.StringIO()
    summary = await import_csv(settings, write_csv(tmp_path / "in.csv", rows), progress=progress)
    assert summary.line() == (
        "import-csv: 1202 rows, 1200 accepted, 2 rejected (1 negative_value, 1 unknown_unit)"
    )
    shown = progress.getvalue()
    assert "import-csv" in shown
    assert "100%" in shown
    assert "1202/1202" in shown
