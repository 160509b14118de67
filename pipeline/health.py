"""Health state of the components a worker runs, as reported on `/health…` (design §9)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol


class Component(Protocol):
    def status(self) -> tuple[bool, dict[str, Any]]: ...


@dataclass
class MqttHealth:
    """Bridge state. `silence_threshold_s` (opt-in) turns a long silence into unhealthy."""

    silence_threshold_s: float | None = None
    connected: bool = False
    subscribed: bool = False
    reconnects: int = 0
    last_error: str | None = None
    last_message_at: float | None = None
    connected_since: float | None = None
    #: Another replica holds the MQTT session; this one waits to take over (design §14).
    standby: bool = False
    #: The MQTT version of the connection ("5" or "3.1.1"), None before the first.
    protocol: str | None = None
    #: Times the bridge stopped reading its socket with PIPELINE_MQTT_RECEIVE_MAXIMUM waiting.
    reading_paused: int = 0
    #: Set once the first subscription stands (messages published earlier may be lost), or
    #: once the bridge found another replica holding the session.
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def message_received(self) -> None:
        self.last_message_at = time.monotonic()

    def status(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        reference = self.last_message_at or self.connected_since
        silence = None if reference is None else round(now - reference, 3)
        healthy = self.connected and self.subscribed
        if healthy and self.silence_threshold_s is not None and silence is not None:
            healthy = silence <= self.silence_threshold_s
        healthy = healthy or self.standby
        return healthy, {
            "role": "standby" if self.standby else "active",
            "connected": self.connected,
            "subscribed": self.subscribed,
            "seconds_since_last_message": (
                None if self.last_message_at is None else round(now - self.last_message_at, 3)
            ),
            "silence_threshold_seconds": self.silence_threshold_s,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "protocol": self.protocol,
            "reading_paused": self.reading_paused,
        }


@dataclass
class AggregationHealth:
    last_run_at: datetime | None = None
    outcome: str | None = None
    intervals: int = 0
    rows: int = 0
    changed: int = 0
    error: str | None = None

    def record(
        self,
        *,
        ok: bool,
        intervals: int = 0,
        rows: int = 0,
        changed: int = 0,
        error: str | None = None,
    ) -> None:
        self.last_run_at = datetime.now(UTC)
        self.outcome = "success" if ok else "failure"
        self.intervals, self.rows, self.changed, self.error = intervals, rows, changed, error

    def status(self) -> tuple[bool, dict[str, Any]]:
        return self.outcome != "failure", {
            "last_run": self.last_run_at.isoformat() if self.last_run_at else None,
            "outcome": self.outcome,
            "intervals": self.intervals,
            "rows": self.rows,
            "changed": self.changed,
            "error": self.error,
        }


@dataclass
class DatabaseHealth:
    """PostgreSQL reachability, from a `SELECT 1` every `interval_s` (see `watch`)."""

    pool: Any
    interval_s: float = 5.0
    timeout_s: float = 2.0
    reachable: bool = True
    error: str | None = None
    checked_at: datetime | None = None

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.pool.fetchval("SELECT 1"), self.timeout_s)
                self.reachable, self.error = True, None
            except Exception as exc:
                self.reachable, self.error = False, repr(exc)
            self.checked_at = datetime.now(UTC)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    def status(self) -> tuple[bool, dict[str, Any]]:
        return self.reachable, {
            "checked_at": self.checked_at.isoformat() if self.checked_at else None,
            "error": self.error,
        }


@dataclass
class Probe:
    """A component whose health is a callable (NATS connected, database reachable, …)."""

    check: Any
    details: Any = None

    def status(self) -> tuple[bool, dict[str, Any]]:
        return bool(self.check()), (self.details() if self.details else {})


@dataclass
class Health:
    components: dict[str, Component] = field(default_factory=dict)

    def overall(self) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {}
        healthy = True
        for name, component in self.components.items():
            ok, details = component.status()
            healthy = healthy and ok
            body[name] = {"status": "UP" if ok else "DOWN", **details}
        return healthy, {"status": "UP" if healthy else "DOWN", "components": body}

    def one(self, name: str) -> tuple[bool, dict[str, Any]] | None:
        component = self.components.get(name)
        if component is None:
            return None
        ok, details = component.status()
        return ok, {"status": "UP" if ok else "DOWN", **details}


def read(http_port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """A worker's /health body (a 503 carries one too); empty when unreachable."""
    url = f"http://{host}:{http_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read() or b"{}"))
    except (OSError, ValueError):
        return {}


def roles(http_port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """A worker's claims and its role in each (`active`, `standby`), read from its /health
    (for tools and tests that pick a worker by what it holds); empty when unreachable."""
    claims = read(http_port, host).get("components", {}).get("claims", {}).get("claims", {})
    return {name: claim["role"] for name, claim in claims.items()}


def nats_node(http_port: int, host: str = "127.0.0.1") -> str | None:
    """`host:port` of the NATS server a worker is connected to, from its /health."""
    connected = read(http_port, host).get("components", {}).get("nats", {}).get("connected_to")
    return str(connected) if connected else None
