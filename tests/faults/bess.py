"""BESS telemetry and HTTP clients in the fault suite: samples mixed into a data set, the
figures of `bess_telemetry`, `bess_interval` and the replayed `BESS_INTERVALS` stream against
`tests.integration.bess_reference`, and gateways that POST through outages, retrying what
was not answered 202 as a real client would."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from tests.integration import bess_reference
from tests.integration.support import stream_messages

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
DEVICES = {("site1", f"bess{n}"): ORG for n in range(1, 4)}
MAX_GAP_S = 300.0


def telemetry(ts: datetime, p: float, soc: float) -> dict[str, Any]:
    return {"ts": ts.isoformat(), "soc": soc, "p": p, "alarms": ["A"] if p > 90 else []}


def samples_for(
    rng: random.Random, base: datetime, devices: Sequence[tuple[str, str]], steps: int
) -> list[tuple[str, str, dict[str, Any]]]:
    """(site, device, sample) in sending order: one per device every 40 s, a power swing
    through zero, and corrections and exact repeats sent a little later."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    later: list[tuple[int, tuple[str, str, dict[str, Any]]]] = []
    for step in range(steps):
        for index, (site, device) in enumerate(devices):
            ts = base + timedelta(seconds=40 * step + index)
            sample = (site, device, telemetry(ts, round(rng.uniform(-100, 100), 2), 50.0))
            roll = rng.random()
            if roll < 0.08:
                fixed = telemetry(ts, round(rng.uniform(-100, 100), 2), 51.0)
                later.append((len(out) + rng.randint(5, 60), (site, device, fixed)))
            elif roll < 0.12:
                later.append((len(out) + rng.randint(1, 30), sample))
            out.append(sample)
            for due in sorted((d for d in later if d[0] <= len(out)), key=lambda d: d[0]):
                later.remove(due)
                out.append(due[1])
    out += [item for _, item in sorted(later, key=lambda d: d[0])]
    return out


def expected(sent: Sequence[tuple[str, str, dict[str, Any]]]) -> bess_reference.Samples:
    """The samples that must be stored: the last one sent per key wins."""
    samples: bess_reference.Samples = {}
    for site, device, sample in sent:
        samples[(site, device, datetime.fromisoformat(sample["ts"]).astimezone(UTC))] = sample
    return samples


@dataclass
class BessFigures:
    lost: int = 0
    wrong_db: int = 0
    wrong_stream: int = 0
    duplicates: int = 0
    gaps: int = 0
    unprocessed: int = 0
    left: int = 0
    details: list[str] = field(default_factory=list)


async def measure(
    db: asyncpg.Connection, nats_url: str, samples: bess_reference.Samples
) -> BessFigures:
    f = BessFigures()
    rows = await db.fetch("SELECT site, device, ts, p, soc, verarbeitet FROM bess_telemetry")
    stored = {(r["site"], r["device"], r["ts"]): (r["p"], r["soc"]) for r in rows}
    for key, sample in samples.items():
        if stored.get(key) != (sample["p"], sample["soc"]):
            f.lost += 1
            f.details.append(f"bess {key}: expected {sample}, got {stored.get(key)}")
    f.lost += len(set(stored) - set(samples))
    f.unprocessed = sum(1 for r in rows if not r["verarbeitet"])
    want = bess_reference.intervals(samples, MAX_GAP_S)
    got = {
        (r["site"], r["device"], r["interval_end"]): bess_reference.of_row(r)
        for r in await db.fetch("SELECT * FROM bess_interval")
    }
    wrong = {k for k in want.keys() | got.keys() if want.get(k) != got.get(k)}
    f.wrong_db = len(wrong)
    f.details += [f"bess_interval {k}: expected {want.get(k)}, got {got.get(k)}" for k in wrong][:5]
    f.left = await db.fetchval(
        "SELECT (SELECT count(*) FROM bess_interval_outbox) + "
        "(SELECT count(*) FROM bess_interval_dirty)"
    )
    published = [json.loads(m.data) for m in await stream_messages(nats_url, "BESS_INTERVALS")]
    keys = [(m["site"], m["device"], m["intervalEnd"]) for m in published]
    copies = Counter((*k, m["revision"]) for k, m in zip(keys, published, strict=True))
    f.duplicates = sum(n - 1 for n in copies.values())
    revisions: dict[Any, list[int]] = {}
    latest: dict[Any, dict[str, Any]] = {}
    for key, m in zip(keys, published, strict=True):
        revisions.setdefault(key, []).append(m["revision"])
        if key not in latest or m["revision"] > latest[key]["revision"]:
            latest[key] = m
    # Revisions rise on the stream in the order they were published, without gaps.
    f.gaps = sum(1 for r in revisions.values() if r != list(range(1, len(r) + 1)))
    on_stream = {
        (s, d, datetime.fromisoformat(e)): bess_reference.of_row(m)
        for (s, d, e), m in latest.items()
    }
    f.wrong_stream = sum(
        1 for k in want.keys() | on_stream.keys() if want.get(k) != on_stream.get(k)
    )
    return f


class Gateways:
    """HTTP clients, one per stream of items, each posting batches in order and posting a batch
    again until it is answered 202 (a 503, a refused connection, a timeout)."""

    def __init__(
        self,
        port: int | Sequence[int],
        token: str,
        batch: int = 20,
        *,
        hold_last: bool = False,
    ) -> None:
        """With several ports (replicas behind a load balancer), a request that is refused or
        not answered goes to the next one."""
        ports = [port] if isinstance(port, int) else list(port)
        self._urls = [f"http://127.0.0.1:{p}" for p in ports]
        self._next = 0
        self._headers = {"Authorization": f"Bearer {token}"}
        self._batch = batch
        self.sent = 0
        self.retries = 0
        self.answered: Counter[int] = Counter()
        #: With `hold_last`, each gateway keeps its last batch until this is set: a fault sets
        #: it when it wants requests in flight (the moment it has made, not one it hopes for).
        self.release = asyncio.Event()
        if not hold_last:
            self.release.set()
        self._refused = asyncio.Event()

    async def refused(self) -> bool:
        """Whether a request has met a 503 or no answer at all."""
        return self._refused.is_set()

    async def post_all(self, streams: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            await asyncio.gather(*(self._post(session, path, items) for path, items in streams))

    async def _post(
        self, session: aiohttp.ClientSession, path: str, items: Sequence[dict[str, Any]]
    ) -> None:
        for start in range(0, len(items), self._batch):
            chunk = list(items[start : start + self._batch])
            if start + self._batch >= len(items):
                await self.release.wait()
            while True:
                try:
                    async with session.post(
                        self._urls[self._next] + path, json=chunk, headers=self._headers
                    ) as resp:
                        self.answered[resp.status] += 1
                        if resp.status == 202:
                            break
                        self._refused.set()
                except (aiohttp.ClientError, TimeoutError):
                    self.answered[0] += 1
                    self._refused.set()
                    self._next = (self._next + 1) % len(self._urls)
                self.retries += 1
                await asyncio.sleep(0.5)
            self.sent += len(chunk)
            await asyncio.sleep(0.05)
