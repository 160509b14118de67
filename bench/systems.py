"""The systems under test, each a set of processes: start, wait until ready, measure, stop.

`raw`, `session`, `bridge`, `mosquitto_sub` and `naive` are the reference subscribers of
`bench.subscribers` (the first four only count: `COUNTERS`); `fused` is one
`pipeline run --mode fused` process; `split` is one `pipeline run --mode split --stage X` process
per stage, as an operator scales them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from pipeline import health
from pipeline.devstack import free_port
from pipeline.topology import STAGES

#: The stages an MQTT reading passes through (the ingest API takes no part in this load).
MQTT_STAGES = tuple(dict.fromkeys(s.name for s in STAGES if not s.reads.startswith("http:")))

KINDS = ("raw", "session", "bridge", "mosquitto_sub", "naive", "nodered", "fused", "split")
#: Subscribers that store nothing: they are timed to the last message counted.
COUNTERS = ("raw", "session", "bridge", "mosquitto_sub")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    http_port: int | None = None
    profiler: subprocess.Popen[bytes] | None = None
    #: A program it runs whose CPU counts as its own (mosquitto_sub under its wrapper).
    child_pid: int | None = None

    def peak_rss_mib(self) -> float:
        """The process's peak resident set (VmHWM), 0 when it is gone or not on Linux."""
        try:
            status = Path(f"/proc/{self.popen.pid}/status").read_text()
        except OSError:
            return 0.0
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        """User plus system CPU time the process (and its child) has used so far."""
        pids = [self.popen.pid] + ([self.child_pid] if self.child_pid else [])
        return sum(_cpu_s(pid) for pid in pids)

    def rss_mib(self) -> float:
        try:
            fields = Path(f"/proc/{self.popen.pid}/statm").read_text().split()
        except OSError:
            return 0.0
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def roles(self) -> dict[str, str]:
        """Claim -> active or standby, from the worker's /health (empty if unreachable)."""
        assert self.http_port is not None
        return health.roles(self.http_port)

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.HTTPError, OSError):
            return False


@dataclass
class System:
    kind: str
    procs: list[Proc] = field(default_factory=list)
    mqtt_port: int = 0
    #: The MQTT client id it subscribes with; its session is ended once the system stops.
    client_id: str | None = None
    #: Starts the same system again (for `restart`).
    relaunch: Callable[[], System] | None = field(default=None, repr=False)

    def peak_rss_mib(self) -> dict[str, float]:
        return {p.name: round(p.peak_rss_mib(), 1) for p in self.procs}

    def cpu_s(self) -> float:
        return sum(p.cpu_s() for p in self.procs)

    def rss_mib(self) -> float:
        return sum(p.rss_mib() for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.profiler is not None:
                p.profiler.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
                p.profiler.wait(30)
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.popen.wait(20)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self.client_id is not None:
            forget_session(self.mqtt_port, self.client_id)

    def restart(self) -> None:
        """SIGKILL every process, as a crash or an OOM kill would, and start them again as
        they were (the same client id, so the broker's session and its queue are theirs)."""
        assert self.relaunch is not None
        for p in self.procs:
            p.popen.kill()
            p.popen.wait()
        self.procs = self.relaunch().procs

    def done_at(self, timeout_s: float) -> float | None:
        """For the reference subscribers: when they reported every message seen (monotonic);
        None if they did not within `timeout_s` (messages were lost)."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            out = p.popen.stdout
            if out is None:
                continue
            while (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([out], [], [], left)
                if not readable:
                    break
                line = out.readline().decode()
                if not line:  # the subscriber exited
                    break
                if line.startswith("done"):
                    return float(line.split()[1])
        return None


def forget_session(mqtt_port: int, client_id: str) -> None:
    """End the broker's session of `client_id`. A session that never expires would go on
    queueing every later run's messages for a client that is gone, work the broker does
    during the runs that follow (a clean start discards a session, MQTT 3.1.1 §3.1.2.4)."""

    async def clean() -> None:
        async with aiomqtt.Client("127.0.0.1", mqtt_port, identifier=client_id, clean_session=True):
            pass

    with contextlib.suppress(aiomqtt.MqttError, OSError):
        asyncio.run(clean())


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NODERED = Path(__file__).parent / "nodered"
NODERED_START_S = 120.0


def available(kinds: list[str]) -> list[str]:
    """The kinds this machine can run: mosquitto_sub where mosquitto is installed, Node-RED
    where Node.js and npm are (its packages are installed from `bench/nodered`)."""
    have = {
        "mosquitto_sub": bool(shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")),
        "nodered": bool(shutil.which("node") and shutil.which("npm")),
    }
    return [k for k in kinds if have.get(k, True)]


def install_nodered() -> Path:
    """Node-RED and pg from `bench/nodered/package-lock.json` (once); its entry point."""
    red = NODERED / "node_modules" / "node-red" / "red.js"
    if not red.exists():
        npm = shutil.which("npm")
        assert npm is not None
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel", "error"], cwd=NODERED, check=True
        )
    return red


def _start_nodered(system: System, mqtt_port: int, env: dict[str, str], logdir: Path) -> None:
    """The flow of `bench/nodered/flows.json`, ready once its MQTT node is connected."""
    red, node = install_nodered(), shutil.which("node")
    assert node is not None
    userdir = logdir / "nodered-userdir"
    userdir.mkdir(exist_ok=True)
    log = logdir / "nodered.log"
    argv = [node, str(red), "--settings", str(NODERED / "settings.js")]
    argv += ["--userDir", str(userdir), str(NODERED / "flows.json")]
    popen = subprocess.Popen(
        argv,
        env={
            **os.environ,
            "MQTT_PORT": str(mqtt_port),
            "MQTT_CLIENT_ID": env["PIPELINE_MQTT_CLIENT_ID"],
            "DATABASE_URL": env["PIPELINE_DATABASE_URL"],
            "NODERED_PORT": str(free_port()),
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    system.procs.append(Proc("nodered", popen))
    deadline = time.monotonic() + NODERED_START_S
    while "Connected to broker" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline or popen.poll() is not None:
            system.stop()
            raise RuntimeError(f"Node-RED did not connect to the broker; see {log}")
        time.sleep(0.1)


def start(
    kind: str,
    *,
    mqtt_port: int,
    expected: int,
    env: dict[str, str],
    logdir: Path,
    profile: Path | None = None,
    replicas: int = 1,
) -> System:
    system = System(kind, mqtt_port=mqtt_port, client_id=env.get("PIPELINE_MQTT_CLIENT_ID"))
    system.relaunch = lambda: start(
        kind, mqtt_port=mqtt_port, expected=expected, env=env, logdir=logdir, replicas=replicas
    )
    if kind == "nodered":
        _start_nodered(system, mqtt_port, env, logdir)
        return system
    if kind in (*COUNTERS, "naive"):
        argv = [sys.executable, "-m", "bench.subscribers", kind, str(mqtt_port), str(expected)]
        if kind == "naive":
            argv.append(env["PIPELINE_DATABASE_URL"])
        popen = subprocess.Popen(
            argv,
            env={**os.environ, "PIPELINE_MQTT_CLIENT_ID": env["PIPELINE_MQTT_CLIENT_ID"]},
            stdout=subprocess.PIPE,
            stderr=(logdir / f"{kind}.log").open("wb"),
        )
        proc = Proc(kind, popen)
        system.procs.append(proc)
        assert popen.stdout is not None
        line = popen.stdout.readline().decode().split()
        if not line or line[0] != "ready":
            system.stop()
            raise RuntimeError(f"{kind} subscriber did not start: {line!r}; see {logdir}")
        proc.child_pid = int(line[1]) if len(line) > 1 else None
        return system
    groups = [[]] if kind == "fused" else [["--stage", s] for s in MQTT_STAGES]
    for args, replica in [(a, n) for a in groups for n in range(1, replicas + 1)]:
        name = "fused" if kind == "fused" else args[1]
        name += f"-{replica}" if replicas > 1 else ""
        port = free_port()
        popen = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--mode", kind, *args],
            env={**os.environ, "PIPELINE_API_PORT": "0", **env, "PIPELINE_HTTP_PORT": str(port)},
            stdout=subprocess.DEVNULL,
            stderr=(logdir / f"{kind}-{name}.log").open("wb"),
            stdin=subprocess.DEVNULL,
        )
        proc = Proc(name, popen, port)
        system.procs.append(proc)  # stopped with the system, also if what follows fails
        if profile is not None:
            try:
                proc.profiler = _profile(popen.pid, profile / f"{kind}-{name}.txt")
            except OSError:
                system.stop()
                raise
    deadline = time.monotonic() + 60
    while not all(p.healthy() for p in system.procs):
        if time.monotonic() > deadline or any(p.popen.poll() is not None for p in system.procs):
            system.stop()
            raise RuntimeError(f"{kind} workers did not become healthy; see {logdir}")
        time.sleep(0.1)
    return system


def _profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` from outside, so the profile costs the worker next to nothing;
    collapsed stacks (`--format raw`), which `bench.profile` sums per function."""
    # The venv's own when the bench runs as .venv/bin/python without the venv on PATH.
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
