"""The load: readings of a fleet of units, published by separate cheap publisher processes.

Each publisher is one unit (one topic) and one process: `mosquitto_pub -l` where installed (a C
client, so the load generator does not compete with the system under test for the interpreter),
else `python -m bench.publisher`, which reads the same lines. Closed loop: every line is in the
pipe at start and the publishers go as fast as the broker lets them. Open loop: the lines are
written into the pipes at a fixed rate by a pacer thread, each at its scheduled time, and latency
is measured from that time, so a stalled system cannot hide its backlog (no coordinated
omission).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

#: Readings start here, one per minute and unit: old enough that every interval is due at once.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Unit:
    organization_id: uuid.UUID
    einheit_id: int
    #: Where its readings are stored (the table the bench counts rows of).
    table = "zaehler_rohdaten"

    @property
    def topic(self) -> str:
        return f"zev/{self.organization_id}/{self.einheit_id}/messwert"


@dataclass(frozen=True)
class Device:
    """A battery storage system (BESS) of the load, registered in `bess_device`."""

    organization_id: uuid.UUID
    site: str
    device: str
    table = "bess_telemetry"

    @property
    def topic(self) -> str:
        return f"bess/{self.site}/{self.device}/telemetry"


@dataclass
class Load:
    """`per_unit` messages for each of `units`; `lines[i]` are unit i's payloads in order."""

    units: Sequence[Unit | Device]
    per_unit: int
    lines: list[list[bytes]] = field(default_factory=list)

    @property
    def table(self) -> str:
        return self.units[0].table

    @property
    def total(self) -> int:
        return len(self.units) * self.per_unit

    @staticmethod
    def timestamp(index: int) -> datetime:
        return EPOCH + timedelta(minutes=index)


def make_load(total: int, publishers: int, seed: int = 1, organizations: int = 4) -> Load:
    rnd = random.Random(seed)
    orgs = [uuid.UUID(int=rnd.getrandbits(128), version=4) for _ in range(organizations)]
    units = [Unit(orgs[i % organizations], 9_100_000 + i) for i in range(publishers)]
    per_unit = max(total // publishers, 1)
    load = Load(units, per_unit)
    for _ in units:
        payloads = []
        for i in range(per_unit):
            at = Load.timestamp(i).isoformat()
            verbrauch = rnd.randrange(0, 50_000) / 10_000
            einspeisung = rnd.randrange(0, 20_000) / 10_000
            payloads.append(
                f'{{"timestamp":"{at}","verbrauch":{verbrauch},"einspeisung":{einspeisung}}}'.encode()
            )
        load.lines.append(payloads)
    return load


def make_bess_load(total: int, publishers: int, seed: int = 1) -> Load:
    """BESS telemetry: one device per publisher, a sample every 5 s, power swinging through
    zero, with every optional field, as a real battery sends it."""
    rnd = random.Random(seed)
    org = uuid.UUID(int=rnd.getrandbits(128), version=4)
    devices = [Device(org, f"site{i // 4}", f"bess{i % 4}") for i in range(publishers)]
    per_unit = max(total // publishers, 1)
    load = Load(devices, per_unit)
    for _ in devices:
        payloads = []
        for i in range(per_unit):
            at = (EPOCH + timedelta(seconds=5 * i)).isoformat()
            p = round(rnd.uniform(-250, 250), 2)
            payloads.append(
                (
                    f'{{"ts":"{at}","soc":{rnd.uniform(5, 95):.2f},"p":{p},'
                    f'"p_ch":{max(-p, 0)},"p_dis":{max(p, 0)},"v_dc":780.5,"i_dc":{p * 1.28:.1f},'
                    f'"t_cell_max":{rnd.uniform(20, 40):.1f},"soh":98.6,"alarms":[]}}'
                ).encode()
            )
        load.lines.append(payloads)
    return load


def publisher_argv(mqtt_port: int, topic: str, client_id: str) -> tuple[list[str], str]:
    """The command of one publisher reading payload lines on stdin, and what it is."""
    binary = shutil.which("mosquitto_pub")
    if binary:
        argv = [binary, "-h", "127.0.0.1", "-p", str(mqtt_port), "-q", "1", "-t", topic]
        return [*argv, "-i", client_id, "-l", "--nodelay"], "mosquitto_pub"
    argv = [sys.executable, "-m", "bench.publisher", str(mqtt_port), topic, client_id]
    return argv, "python"


def spawn_publishers(load: Load, mqtt_port: int, run_id: str) -> list[subprocess.Popen[bytes]]:
    procs = []
    for index, unit in enumerate(load.units):
        argv, _ = publisher_argv(mqtt_port, unit.topic, f"bench-pub-{run_id}-{index}")
        procs.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        )
    return procs


@contextlib.contextmanager
def publishing(load: Load, mqtt_port: int, run_id: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The publishers of `load`; whichever are still running at the end are killed."""
    procs = spawn_publishers(load, mqtt_port, run_id)
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def closed_loop(procs: Sequence[subprocess.Popen[bytes]], load: Load) -> float:
    """Hand every publisher all its lines at once; returns the monotonic start time."""
    started = time.monotonic()
    writers = [
        threading.Thread(target=_feed_all, args=(proc, lines), daemon=True)
        for proc, lines in zip(procs, load.lines, strict=True)
    ]
    for writer in writers:
        writer.start()
    return started


def _feed_all(proc: subprocess.Popen[bytes], lines: list[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"\n".join(lines) + b"\n")
    proc.stdin.close()


class Pacer(threading.Thread):
    """Open loop: writes reading k (round robin over units) at `start + k / rate_per_s`.

    `scheduled[(einheit_id, reading index)]` is the time each was due, the origin of its latency.
    """

    def __init__(
        self, procs: Sequence[subprocess.Popen[bytes]], load: Load, rate_per_s: float
    ) -> None:
        super().__init__(daemon=True, name="pacer")
        self.procs = procs
        self.load = load
        self.rate_per_s = rate_per_s
        self.scheduled: dict[tuple[int, int], float] = {}
        self.start_s = 0.0
        self.late_s = 0.0  # how far behind schedule the pacer itself fell, worst case

    def run(self) -> None:
        self.start_s = time.monotonic() + 0.2
        units = len(self.load.units)
        for k in range(self.load.total):
            unit, index = k % units, k // units
            due = self.start_s + k / self.rate_per_s
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                self.late_s = max(self.late_s, now - due)
            meter = self.load.units[unit]
            assert isinstance(meter, Unit), "open loop: meter readings only"
            self.scheduled[(meter.einheit_id, index)] = due
            stdin = self.procs[unit].stdin
            assert stdin is not None
            stdin.write(self.load.lines[unit][index] + b"\n")
            stdin.flush()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()


def finish(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> list[str]:
    """Wait for the publishers; returns the complaints of those that failed."""
    problems = []
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            problems.append(f"publisher exited {proc.returncode}: {err.strip()[:200]}")
    return problems
