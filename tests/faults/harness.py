"""The parts of a fault test: `pipeline run` workers as real processes (to SIGKILL), a device
fleet that keeps publishing through broker restarts, a data set with its independently computed
expectation, and the figures that compare what the pipeline produced with it."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import nats

from pipeline import health
from pipeline.devstack import free_port
from pipeline.topology import STREAMS
from tests.faults import bess as faults_bess
from tests.integration import bess_reference
from tests.integration.support import Reference, body, latest_by_key, stream_messages

ROOT = Path(__file__).resolve().parents[2]
ORGS = (
    uuid.UUID("550e8400-e29b-41d4-a716-446655440000"),
    uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
)
UNITS = {unit: ORGS[(unit - 1) % 2] for unit in range(1, 21)}  # as in tests/corpus

Reading = tuple[int, datetime, str, str]
BY_STREAM = {stream.name: stream for stream in STREAMS}


# --- the data set ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Nudge:
    """A nudge to send, and how its effect shows: its row in zaehler_rohdaten, and on
    MESSWERTE its unit's interval ending at `zeit`, summed over `count` readings or more."""

    topic: str
    payload: bytes
    unit: int
    at: datetime
    zeit: datetime
    count: int

    @property
    def subject(self) -> str:
        return f"messwerte.{UNITS[self.unit]}.{self.unit}"

    def shows_in(self, message: dict[str, Any]) -> bool:
        """Whether a MESSWERTE message is the nudge's interval, summed with the nudge."""
        return (
            message.get("einheitId") == self.unit
            and datetime.fromisoformat(message["zeit"]) == self.zeit
            and message.get("anzahlRohwerte", 0) >= self.count
        )


@dataclass
class DataSet:
    """What the fleet publishes, in order, and the readings that must end up stored."""

    messages: list[tuple[str, bytes]]
    readings: list[Reading]
    #: The hour the readings start at; the quarter hour before it holds no reading of the set.
    base: datetime
    #: BESS samples that must end up stored (over MQTT and HTTP), last write per key.
    bess: bess_reference.Samples = field(default_factory=dict)
    #: What HTTP gateways post, one (path, items) stream per gateway.
    http: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)

    @property
    def reference(self) -> Reference:
        return Reference.of(self.readings)

    def nudge(self) -> Nudge:
        """A reading of its own (a key no other message has) in a long-closed interval, added
        to the expectation: a fault sends it to make the pipeline sum and publish an interval
        at the moment the fault needs one, instead of hoping one closes then."""
        unit = 1
        taken = sum(1 for r in self.readings if r[1] < self.base)
        reading = (unit, self.base - timedelta(minutes=1, seconds=taken), "0.5", "0.25")
        self.readings.append(reading)
        message = (_topic(UNITS[unit], unit), body(reading[1], reading[2], reading[3]))
        self.messages.append(message)
        # Only nudges fall before `base`: the interval ending there sums every one sent so far.
        return Nudge(*message, unit=unit, at=reading[1], zeit=self.base, count=taken + 1)


def data_set(
    seed: int,
    *,
    per_unit: int = 50,
    base: datetime | None = None,
    bess: bool = False,
    xyx: bool = False,
) -> DataSet:
    """Readings every 2 minutes per unit in closed intervals (so every interval is summed while
    the data still arrives), some on a quarter hour, with corrections and exact repeats sent
    some messages later, as meters re-send. With `bess`, BESS samples of two devices are mixed
    in over MQTT, and a third device's samples and some meter readings wait for gateways. With
    `xyx`, some readings are sent as X, then Y, then X again, each some messages after the one
    before (design §14: it must end as X, whichever replicas take the three)."""
    rng = random.Random(seed)
    base = base or (datetime.now(UTC) - timedelta(hours=4)).replace(
        minute=0, second=0, microsecond=0
    )
    messages: list[tuple[str, bytes]] = []
    readings: list[Reading] = []
    later: list[tuple[int, int, Reading]] = []  # heap of (send after message n, tiebreak, reading)

    def send(reading: Reading) -> None:
        unit, at, verbrauch, einspeisung = reading
        messages.append((_topic(UNITS[unit], unit), body(at, verbrauch, einspeisung)))
        readings.append(reading)

    for step in range(per_unit):
        for unit in UNITS:
            at = base + timedelta(minutes=2 * step, seconds=unit - 1)
            reading = (unit, at, _kwh(rng, 99999), _kwh(rng, 9999))
            roll = rng.random()
            if roll < 0.10:  # a correction: other values for the same unit and instant
                fixed = (unit, at, _kwh(rng, 99999), reading[3])
                heapq.heappush(later, (len(messages) + rng.randint(20, 200), len(later), fixed))
            elif roll < 0.15:  # an exact repeat
                heapq.heappush(later, (len(messages) + rng.randint(1, 100), len(later), reading))
            elif xyx and roll < 0.25:  # X now, Y later, X again later still
                other = (unit, at, _kwh(rng, 99999), reading[3])
                y_after = len(messages) + rng.randint(5, 80)
                heapq.heappush(later, (y_after, len(later), other))
                heapq.heappush(later, (y_after + rng.randint(5, 80), len(later), reading))
            send(reading)
            while later and later[0][0] <= len(messages):
                send(heapq.heappop(later)[2])
    while later:
        send(heapq.heappop(later)[2])
    data = DataSet(messages, readings, base)
    if bess:
        _add_bess(data, rng)
    return data


def _add_bess(data: DataSet, rng: random.Random) -> None:
    over_mqtt = faults_bess.samples_for(
        rng, data.base, [("site1", "bess1"), ("site1", "bess2")], 150
    )
    over_http = faults_bess.samples_for(rng, data.base, [("site1", "bess3")], 150)
    zev = data.messages
    merged: list[tuple[str, bytes]] = []
    for index, message in enumerate(zev):
        merged.append(message)
        for site, device, sample in over_mqtt[
            index * len(over_mqtt) // len(zev) : (index + 1) * len(over_mqtt) // len(zev)
        ]:
            merged.append((f"bess/{site}/{device}/telemetry", json.dumps(sample).encode()))
    data.messages = merged
    data.bess = faults_bess.expected([*over_mqtt, *over_http])
    data.http.append(("/api/ingest", [{"site": s, "device": d, **x} for s, d, x in over_http]))
    # Meter readings of their own keys (30 s past the fleet's), with corrections, per gateway.
    for unit in (1, 3):
        items = []
        for step in range(50):
            at = data.base + timedelta(minutes=2 * step, seconds=30)
            verbrauch = _kwh(rng, 9999)
            items.append({"einheitId": unit, "timestamp": at.isoformat(),
                          "verbrauch": float(verbrauch), "einspeisung": 0})  # fmt: skip
            data.readings.append((unit, at, verbrauch, "0"))
            if rng.random() < 0.1:
                fixed = _kwh(rng, 9999)
                items.append({**items[-1], "verbrauch": float(fixed)})
                data.readings.append((unit, at, fixed, "0"))
        data.http.append(("/api/zev/messwerte", items))


def _kwh(rng: random.Random, top: int) -> str:
    return f"{rng.randint(0, top) / 10000}"


def _topic(org: uuid.UUID, unit: int) -> str:
    return f"zev/{org}/{unit}/messwert"


# --- workers ---------------------------------------------------------------------------------


class Worker:
    """One `python -m pipeline run` process with its own log and HTTP port."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.args = list(args)
        self.env = env
        self.http_port = free_port()
        self.log_path = logdir / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        env = {
            **os.environ,
            "PIPELINE_API_PORT": "0",
            **self.env,
            "PIPELINE_HTTP_PORT": str(self.http_port),
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", *self.args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def health(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def roles(self) -> dict[str, str]:
        """Claim -> active or standby, from the worker's /health (empty if unreachable)."""
        assert self.http_port is not None
        return health.roles(self.http_port)

    def nats_node(self) -> str | None:
        """`host:port` of the NATS server the worker is connected to, from its /health."""
        return health.nats_node(self.http_port)

    def metric(self, name: str) -> float:
        """One unlabelled sample from the worker's /metrics (0 when absent or unreachable)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def terminate(self, timeout_s: float = 15.0) -> tuple[int | None, float]:
        """SIGTERM; return the exit code and how long the drain took."""
        if self.proc is None or self.proc.poll() is not None:
            return (self.proc.returncode if self.proc else None), 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            code = None
        return code, time.monotonic() - started

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            return f"--- {self.name} ---\n" + "\n".join(text)
        return ""


class Workers:
    """The pipeline as an operator runs it: one fused process, or one process per stage."""

    SPLIT = ("mqtt_bridge", "validate", "dedupe", "persist", "window_aggregate", "publish")

    def __init__(self, mode: str, env: dict[str, str], logdir: Path, replicas: int = 1) -> None:
        """`replicas` processes of each (named `fused-1`, `fused-2`, …, or `fused` alone)."""
        self.mode = mode
        roles = {"fused": ["--mode", "fused"]} if mode == "fused" else {
            stage: ["--mode", "split", "--stage", stage] for stage in self.SPLIT
        }  # fmt: skip
        self.by_name = {}
        for role, args in roles.items():
            for n in range(1, replicas + 1):
                name = role if replicas == 1 else f"{role}-{n}"
                own = dict(env)
                if replicas > 1 and env.get("PIPELINE_API_PORT", "0") != "0":
                    own["PIPELINE_API_PORT"] = str(free_port())  # replicas on one machine
                self.by_name[name] = Worker(name, args, own, logdir)

    @property
    def api_ports(self) -> list[int]:
        """The ingest API's port of each worker that serves it."""
        ports = {int(w.env.get("PIPELINE_API_PORT", "0")) for w in self.by_name.values()}
        return sorted(ports - {0})

    def holder(self, claim: str) -> Worker:
        """The running worker whose /health says it is active for `claim`."""
        for worker in self.by_name.values():
            if worker.running and worker.roles().get(claim) == "active":
                return worker
        raise LookupError(claim)

    def __getitem__(self, name: str) -> Worker:
        return self.by_name[name]

    async def start(self, timeout_s: float = 60.0) -> None:
        for worker in self.by_name.values():
            worker.start()
        deadline = time.monotonic() + timeout_s
        for worker in self.by_name.values():
            while await asyncio.to_thread(worker.health) != 200:
                if worker.proc is not None and worker.proc.poll() is not None:
                    raise RuntimeError(f"worker exited at start-up:\n{worker.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not healthy:\n{worker.tail()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> dict[str, tuple[int | None, float]]:
        results = await asyncio.gather(
            *(asyncio.to_thread(w.terminate) for w in self.by_name.values())
        )
        return dict(zip(self.by_name, results, strict=True))

    def tails(self) -> str:
        return "\n".join(w.tail() for w in self.by_name.values())


# --- the fleet -------------------------------------------------------------------------------


class Fleet:
    """Devices publishing a data set at a steady rate (QoS 1), through broker restarts.

    A publish that fails (broker gone) is sent again after reconnecting, as a device would:
    the pipeline must treat such a re-send as the exact repeat it is.
    """

    def __init__(self, broker_port: int, rate_per_s: float) -> None:
        self._port = broker_port
        self._rate = rate_per_s
        self.sent = 0
        self.resent = 0
        self._progress = asyncio.Condition()

    async def publish(self, messages: Sequence[tuple[str, bytes | str]]) -> None:
        started = time.monotonic()
        index = 0
        while index < len(messages):
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self._port, identifier=f"fleet-{uuid.uuid4().hex[:8]}"
                ) as client:
                    while index < len(messages):
                        topic, payload = messages[index]
                        await client.publish(topic, payload, qos=1, timeout=5)
                        index += 1
                        await self._advance(index)
                        ahead = index / self._rate - (time.monotonic() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            except (aiomqtt.MqttError, TimeoutError):
                self.resent += 1
                await asyncio.sleep(0.2)

    async def _advance(self, index: int) -> None:
        async with self._progress:
            self.sent = index
            self._progress.notify_all()

    async def reached(self, count: int) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: self.sent >= count)


async def while_publishing(
    fleet: Fleet,
    messages: Sequence[tuple[str, bytes | str]],
    faults: Sequence[tuple[float, Callable[[], Coroutine[Any, Any, None]]]],
) -> None:
    """Publish `messages`; run each fault once the given fraction of them has been sent."""
    publishing = asyncio.create_task(fleet.publish(messages))
    try:
        for fraction, fault in faults:
            reached = asyncio.create_task(fleet.reached(int(len(messages) * fraction)))
            await asyncio.wait({reached, publishing}, return_when=asyncio.FIRST_COMPLETED)
            if publishing.done() and not reached.done():
                reached.cancel()
                publishing.result()
            await fault()
        await publishing
    finally:
        publishing.cancel()


# --- holding a worker mid-batch --------------------------------------------------------------


@contextlib.asynccontextmanager
async def stream_refusing(nats_url: str, stream: str) -> AsyncIterator[None]:
    """`stream` refuses every message (max_msg_size 1) until the block is left; a worker that
    writes to it keeps its batch in flight, unacknowledged, retrying."""
    nc = await nats.connect(nats_url.split(","))
    try:
        js = nc.jetstream()
        config = (await js.stream_info(stream)).config
        config.max_msg_size = 1
        await js.update_stream(config)
        try:
            yield
        finally:
            await js.update_stream(BY_STREAM[stream].config())
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def table_locked(dsn: str, table: str) -> AsyncIterator[asyncpg.Connection]:
    """`table` locked against writes (and row locks) until the block is left."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            yield conn
    finally:
        await conn.close()


async def unacknowledged(nats_url: str, stream: str, durable: str) -> int:
    """Messages the consumer `durable` has handed out and not yet had acknowledged."""
    nc = await nats.connect(nats_url.split(","))
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        return int(info.num_ack_pending or 0)
    finally:
        await nc.close()


async def waiting_on_locks(conn: asyncpg.Connection) -> int:
    """Other sessions of this database blocked on a lock (seen from the lock holder)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")  # else cached for the transaction
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    )


async def outbox_claimed(dsn: str) -> bool:
    """A publisher holds outbox rows it has claimed and not yet removed."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            total = await conn.fetchval("SELECT count(*) FROM messwerte_outbox")
            free = await conn.fetchval(
                "SELECT count(*) FROM (SELECT id FROM messwerte_outbox FOR UPDATE SKIP LOCKED) f"
            )
        return bool(total > free)
    finally:
        await conn.close()


async def until(probe: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30.0) -> None:
    """Poll `probe` until it is truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


class Progress:
    """How long a fault stops the pipeline: `mark()` just before the fault notes what MESSWERTE
    holds; `resumed()` sends a reading of its own (a nudge: a key nobody else sends, in a
    closed interval) and waits until it is stored and its interval is published with it. Both
    need the pipeline working end to end after the fault, whether or not the fleet is still
    publishing; neither can be met by work done before the fault (a message published in the
    moment between `mark()` and the fault cannot hold a reading sent after it)."""

    def __init__(self, dsn: str, nats_url: str, nudge: Callable[[], Awaitable[Nudge]]) -> None:
        self._dsn = dsn
        self._nats_url = nats_url
        self._nudge = nudge
        #: MESSWERTE's sequence to look on from for the nudge's interval.
        self._from_seq = 1
        self._at = 0.0

    async def _last_published(self) -> int | None:
        try:
            nc = await nats.connect(
                self._nats_url.split(","), connect_timeout=2, allow_reconnect=False
            )
            try:
                info = await nc.jetstream(timeout=2).stream_info("MESSWERTE")
            finally:
                await nc.close()
            return int(info.state.last_seq)
        except Exception:  # a node away: ask again
            return None

    async def _published(self, nudge: Nudge) -> bool:
        """Whether MESSWERTE holds the nudge's interval summed with it, looking at each
        message of its subject once (from where the last look ended)."""
        try:
            nc = await nats.connect(
                self._nats_url.split(","), connect_timeout=2, allow_reconnect=False
            )
        except Exception:  # a node away: ask again
            return False
        try:
            js = nc.jetstream(timeout=2)
            while True:
                msg = await js.get_msg(
                    "MESSWERTE", self._from_seq, subject=nudge.subject, next=True
                )
                self._from_seq = int(msg.seq or 0) + 1
                if nudge.shows_in(json.loads(msg.data or b"{}")):
                    return True
        except Exception:  # none further yet (not found), or a node away: ask again
            return False
        finally:
            await nc.close()

    async def _stored(self, nudge: Nudge) -> bool:
        try:
            db = await asyncpg.connect(self._dsn, timeout=2)
        except Exception:
            return False
        try:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM zaehler_rohdaten WHERE einheit_id = $1 "
                    "AND timestamp = $2",
                    nudge.unit,
                    nudge.at,
                )
            )
        except Exception:
            return False
        finally:
            await db.close()

    async def mark(self) -> None:
        published = None
        while published is None:
            published = await self._last_published()
        self._from_seq, self._at = published + 1, time.monotonic()

    async def resumed(self, timeout_s: float = 60.0) -> float:
        """Seconds from `mark()` until a reading sent now is stored and published."""
        nudge = await self._nudge()
        stored = published = False
        while True:
            stored = stored or await self._stored(nudge)
            published = published or await self._published(nudge)
            if stored and published:
                return time.monotonic() - self._at
            if time.monotonic() - self._at > timeout_s:
                raise AssertionError(
                    f"no progress within {timeout_s}s of the fault "
                    f"(nudge stored: {stored}, its interval published: {published})"
                )
            await asyncio.sleep(0.1)


# --- what came out, against the reference ----------------------------------------------------


@dataclass
class Figures:
    """How far the pipeline's result is from the reference; all zero is correct."""

    readings_lost: int = 0  # expected raw rows missing or with other values
    readings_extra: int = 0  # raw rows nobody sent
    intervals_wrong_db: int = 0  # messwerte rows missing, extra or with other sums
    intervals_wrong_stream: int = 0  # latest published message per interval differs
    duplicates_published: int = 0  # one (unit, interval, revision) published more than once
    revision_gaps: int = 0  # intervals whose published revisions are not 1..n
    revisions_out_of_order: int = 0  # intervals with a revision on the stream after a later one
    unprocessed: int = 0  # raw rows never marked verarbeitet
    outbox_left: int = 0  # aggregates held in the outbox, never published
    details: list[str] = field(default_factory=list, compare=False)
    #: The longest time without progress after a fault (fault -> first new row or message).
    stalled_s: float = field(default=0.0, compare=False)

    @property
    def correct(self) -> bool:
        return self == Figures()


async def measure(db: asyncpg.Connection, nats_url: str, reference: Reference) -> Figures:
    f = Figures()
    rows = await db.fetch(
        "SELECT einheit_id, timestamp, verbrauch, einspeisung, verarbeitet FROM zaehler_rohdaten"
    )
    raw = {(r["einheit_id"], r["timestamp"]): (r["verbrauch"], r["einspeisung"]) for r in rows}
    for key, values in reference.raw.items():
        if raw.get(key) != values:
            f.readings_lost += 1
            f.details.append(f"raw {key}: expected {values}, got {raw.get(key)}")
    f.readings_extra = len(set(raw) - set(reference.raw))
    f.unprocessed = sum(1 for r in rows if not r["verarbeitet"])

    expected = reference.messwerte()
    got = {
        (r["einheit_id"], r["zeit"]): (r["verbrauch"], r["einspeisung"], r["anzahl_rohwerte"])
        for r in await db.fetch(
            "SELECT einheit_id, zeit, verbrauch, einspeisung, anzahl_rohwerte FROM messwerte"
        )
    }
    wrong = {k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k)}
    f.intervals_wrong_db = len(wrong)
    f.details += [f"messwerte {k}: expected {expected.get(k)}, got {got.get(k)}" for k in wrong][:5]
    f.outbox_left = await db.fetchval("SELECT count(*) FROM messwerte_outbox")

    published = [json.loads(m.data) for m in await stream_messages(nats_url, "MESSWERTE")]
    copies = Counter((m["einheitId"], m["zeit"], m["revision"]) for m in published)
    f.duplicates_published = sum(n - 1 for n in copies.values())
    revisions: dict[tuple[int, str], list[int]] = {}
    for message in published:
        revisions.setdefault((message["einheitId"], message["zeit"]), []).append(
            message["revision"]
        )
    f.revision_gaps = sum(
        1 for r in revisions.values() if sorted(set(r)) != list(range(1, len(set(r)) + 1))
    )
    f.revisions_out_of_order = sum(1 for r in revisions.values() if r != sorted(r))
    latest = {
        key: (Decimal(str(m["verbrauch"])), Decimal(str(m["einspeisung"])), m["anzahlRohwerte"])
        for key, m in latest_by_key(published).items()
    }
    wanted = {(u, z.isoformat().replace("+00:00", "Z")): v for (u, z), v in expected.items()}
    f.intervals_wrong_stream = sum(
        1 for k in wanted.keys() | latest.keys() if wanted.get(k) != latest.get(k)
    )
    return f


def _with_bess(f: Figures, b: faults_bess.BessFigures) -> Figures:
    f.readings_lost += b.lost
    f.intervals_wrong_db += b.wrong_db
    f.intervals_wrong_stream += b.wrong_stream
    f.duplicates_published += b.duplicates
    f.revision_gaps += b.gaps
    f.unprocessed += b.unprocessed
    f.outbox_left += b.left
    f.details += b.details[:5]
    return f


async def converge(
    dsn: str, nats_url: str, data: DataSet, timeout_s: float = 90.0
) -> tuple[Figures, float]:
    """Poll until the result equals the reference or the deadline passes; return the last
    figures and how long it took. Connects anew each time: the database may have restarted."""
    started = time.monotonic()
    while True:
        try:
            db = await asyncpg.connect(dsn, timeout=5)
        except OSError:
            figures = Figures(details=["database unreachable"])
        else:
            try:
                figures = await measure(db, nats_url, data.reference)
                if data.bess:
                    bess = await faults_bess.measure(db, nats_url, data.bess)
                    figures = _with_bess(figures, bess)
            finally:
                await db.close()
        elapsed = time.monotonic() - started
        if figures.correct or elapsed > timeout_s:
            return figures, elapsed
        await asyncio.sleep(0.5)


# --- one scenario, end to end ----------------------------------------------------------------

Fault = Callable[[], Coroutine[Any, Any, None]]
#: (scenario, messages sent, figures, seconds from the last message to a correct result)
REPORT: list[tuple[str, int, Figures, float]] = []
RATE_PER_S = 250.0
DRAIN_LIMIT_S = 10.0


async def scenario(
    name: str,
    workers: Workers,
    broker_port: int,
    dsn: str,
    nats_url: str,
    data: DataSet,
    faults: Callable[[Workers], Sequence[tuple[float, Fault]]],
    *,
    timeout_s: float = 90.0,
    gateways: faults_bess.Gateways | None = None,
    stalls: list[float] | None = None,
    rate_per_s: float = RATE_PER_S,
) -> Figures:
    """Start the workers, publish `data` (and post its HTTP part through `gateways`) while the
    faults strike, wait for the result to settle, stop the workers with SIGTERM, record the
    figures and check them."""
    await workers.start()
    fleet = Fleet(broker_port, rate_per_s)
    posting = asyncio.create_task(gateways.post_all(data.http)) if gateways else None
    try:
        await while_publishing(fleet, data.messages, faults(workers))
        if posting is not None:
            await asyncio.wait_for(posting, 120)
        figures, seconds = await converge(dsn, nats_url, data, timeout_s)
    finally:
        exits = await workers.stop()
    figures.stalled_s = max(stalls or [0.0])
    REPORT.append((name, len(data.messages) + fleet.resent, figures, seconds))
    assert figures.correct, f"{figures}\n{workers.tails()}"
    for worker, (code, drained_s) in exits.items():
        assert code == 0, f"{worker} exited with {code} on SIGTERM\n{workers[worker].tail()}"
        assert drained_s < DRAIN_LIMIT_S, f"{worker} took {drained_s:.1f}s to drain"
    return figures
