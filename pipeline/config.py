"""Settings from the environment (prefix `PIPELINE_`) or a `.env` file, design §7."""

from __future__ import annotations

import sys
from datetime import timedelta
from functools import cached_property
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.topology import DAY_S, StreamPolicy


def redact(url: str) -> str:
    """A URL fit for logs: the password, if any, replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class MqttTarget:
    """The parts of `PIPELINE_MQTT_URL` (`mqtt[s]://user:pass@host:port`)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported MQTT URL scheme {parts.scheme!r}")
        self.tls = parts.scheme in ("mqtts", "ssl")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    def __repr__(self) -> str:  # never print the password
        return f"MqttTarget({'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port})"


class Settings(BaseSettings):
    """Every knob of a worker. Names and defaults of the first block are the contract."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", env_file=".env", extra="ignore")

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    window_grace_seconds: float = Field(default=60, ge=0)
    http_port: int = Field(default=8000, ge=0, le=65535)
    mqtt_client_id: str = "messwerte-bridge"
    log_format: Literal["console", "json"] = Field(
        default_factory=lambda: "console" if sys.stderr.isatty() else "json"
    )
    api_port: int = Field(default=8080, ge=0, le=65535, description="ingest API; 0 = off")
    api_max_body_bytes: int = Field(default=1_048_576, gt=0, description="larger bodies: 413")
    api_body_timeout_seconds: float = Field(
        default=30.0, gt=0, description="a request body sent slower than this is refused (400)"
    )
    bess_max_gap_seconds: float = Field(
        default=300, gt=0, description="BESS samples further apart are not integrated (§13)"
    )
    failover_seconds: float = Field(
        default=10,
        ge=1,
        description="§14: a standby takes over a dead replica's singleton within this",
    )
    raw_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="processed raw rows older than this are pruned, older readings rejected "
        "`too_old`; unset: kept forever",
    )

    # Tuning, not part of the contract.
    log_level: str = "info"
    http_host: str = "0.0.0.0"
    max_payload_bytes: int = Field(default=64 * 1024, gt=0)
    batch_size: int = Field(default=500, gt=0)
    stream_replicas: int = Field(
        default=1, ge=1, le=5, description="replicas of every stream: 3 on a 3-node cluster"
    )
    dedupe_capacity: int = Field(
        default=100_000,
        gt=0,
        description="(unit, timestamp) keys dedupe remembers, about 400 bytes each",
    )
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="auto: MQTT 5 where the broker has it, else 3.1.1"
    )
    sweep_interval_seconds: float = Field(default=1.0, gt=0)
    mqtt_receive_maximum: int = Field(
        default=10_000,
        ge=1,
        le=65_535,
        description="MQTT 5: messages the broker may send before they are acknowledged; the "
        "bridge holds them in memory until stored",
    )
    batch_linger_seconds: float = Field(
        default=0.02,
        ge=0,
        description="the bridge lets a batch smaller than batch_size fill this long",
    )
    mqtt_silence_threshold_seconds: float | None = Field(
        default=None, description="opt-in: /health/mqtt turns 503 after this long without a message"
    )
    db_pool_size: int = Field(default=8, gt=0)
    db_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    db_acquire_timeout_seconds: float = Field(
        default=10.0, gt=0, description="longest wait for a pooled connection"
    )
    db_statement_timeout_seconds: float = Field(default=30.0, gt=0)
    ack_wait_seconds: float = Field(
        default=10.0,
        gt=0,
        description="JetStream redelivers a message a worker took and did not ack after this",
    )
    max_deliver: int = Field(
        default=10, ge=2, description="deliveries before a message goes to dlq.max_deliveries"
    )
    # How long the streams that keep history keep it (JetStream max_age).
    dlq_retention_days: float = Field(default=14, gt=0, description="stream DLQ")
    messwerte_retention_days: float = Field(default=400, gt=0, description="stream MESSWERTE")
    bess_intervals_retention_days: float = Field(
        default=400, gt=0, description="stream BESS_INTERVALS"
    )
    prune_interval_seconds: float = Field(
        default=DAY_S, gt=0, description="how often the sweeper prunes raw rows (if retention)"
    )
    aggregation_concurrency: int = Field(
        default=2,
        ge=1,
        description="chunks of due intervals summed at once, each its own transaction",
    )

    @field_validator("mqtt_url")
    @classmethod
    def _valid_mqtt_url(cls, value: str) -> str:
        MqttTarget(value)
        return value

    @cached_property
    def mqtt(self) -> MqttTarget:
        return MqttTarget(self.mqtt_url)

    @property
    def nats_servers(self) -> list[str]:
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.window_grace_seconds)

    @property
    def raw_retention(self) -> timedelta | None:
        days = self.raw_retention_days
        return None if days is None else timedelta(days=days)

    @property
    def streams(self) -> StreamPolicy:
        return StreamPolicy(
            replicas=self.stream_replicas,
            max_age_s={
                "DLQ": self.dlq_retention_days * DAY_S,
                "MESSWERTE": self.messwerte_retention_days * DAY_S,
                "BESS_INTERVALS": self.bess_intervals_retention_days * DAY_S,
            },
        )
