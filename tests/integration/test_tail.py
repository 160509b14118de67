"""`pipeline tail`: a consumer's view of MESSWERTE, filtered, replayed, and resumed."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import nats

from pipeline.broker import declare_streams
from pipeline.codec import encode
from pipeline.tail import TailOptions, tail
from schemas.output import MesswertMessage

ORG_A = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
ORG_B = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
ZEIT = datetime(2026, 1, 1, 0, 15, tzinfo=UTC)


def messwert(org: uuid.UUID, unit: int, quarter: int, revision: int = 1) -> MesswertMessage:
    zeit = ZEIT + timedelta(minutes=15 * quarter)
    return MesswertMessage(
        organization_id=org,
        einheit_id=unit,
        zeit=zeit,
        interval_start=zeit - timedelta(minutes=15),
        verbrauch=Decimal("1.25") * (quarter + 1),
        einspeisung=Decimal("0"),
        anzahl_rohwerte=15,
        quelle="MQTT",
        revision=revision,
    )


async def publish(url: str, messages: list[MesswertMessage]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await declare_streams(js)
    for message in messages:
        body, headers = encode(message)
        await js.publish(message.subject, body, headers=headers)
    await nc.close()


async def test_tail_replays_only_the_chosen_unit_as_json(nats_server) -> None:
    await publish(
        nats_server.url,
        [
            messwert(ORG_A, 7, 0),
            messwert(ORG_B, 8, 0),
            messwert(ORG_A, 7, 1),
            messwert(ORG_A, 9, 0),
        ],
    )
    out = io.StringIO()
    options = TailOptions(einheit_id=7, from_start=True, count=2, as_json=True)
    assert await asyncio.wait_for(tail([nats_server.url], options, out), 10) == 2
    got = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [(m["einheitId"], m["zeit"]) for m in got] == [
        (7, "2026-01-01T00:15:00Z"),
        (7, "2026-01-01T00:30:00Z"),
    ]


async def test_tail_filters_by_organization_and_prints_a_line_per_interval(nats_server) -> None:
    await publish(nats_server.url, [messwert(ORG_B, 8, 0), messwert(ORG_A, 7, 0, revision=2)])
    out = io.StringIO()
    options = TailOptions(organization_id=ORG_A, from_start=True, count=1)
    await asyncio.wait_for(tail([nats_server.url], options, out), 10)
    [text] = out.getvalue().splitlines()
    assert f"org {ORG_A}" in text
    assert "einheit      7" in text
    assert "rev 2" in text


async def test_tail_follows_new_messages_and_a_durable_one_resumes_where_it_stopped(
    nats_server,
) -> None:
    await publish(nats_server.url, [messwert(ORG_A, 7, q) for q in range(3)])
    first, second = io.StringIO(), io.StringIO()
    durable = TailOptions(durable="report", from_start=True, count=2, as_json=True)
    await asyncio.wait_for(tail([nats_server.url], durable, first), 10)
    # The second run picks up after the two acknowledged ones, and waits for the new one.
    follower = asyncio.create_task(
        tail([nats_server.url], TailOptions(durable="report", count=2, as_json=True), second)
    )
    await publish(nats_server.url, [messwert(ORG_A, 7, 3)])
    await asyncio.wait_for(follower, 10)
    quarters = [
        [json.loads(t)["zeit"][11:16] for t in o.getvalue().splitlines()] for o in (first, second)
    ]
    assert quarters == [["00:15", "00:30"], ["00:45", "01:00"]]


def test_readme_consumer_example_is_valid_python() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Consuming it", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "README example consumer", "exec")
    assert 'stream="MESSWERTE"' in code
