"""Settings from the environment (design §7)."""

from __future__ import annotations

import pytest

from pipeline.config import Settings, redact


def test_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MQTT_URL",
        "NATS_URL",
        "DATABASE_URL",
        "WINDOW_GRACE_SECONDS",
        "HTTP_PORT",
        "MQTT_CLIENT_ID",
    ):
        monkeypatch.delenv(f"PIPELINE_{name}", raising=False)
    s = Settings(_env_file=None)
    assert (s.mqtt_url, s.nats_url, s.database_url) == (
        "mqtt://127.0.0.1:1883",
        "nats://127.0.0.1:4222",
        "postgresql://postgres@127.0.0.1:5432/postgres",
    )
    assert (s.window_grace_seconds, s.http_port, s.mqtt_client_id) == (60, 8000, "messwerte-bridge")


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_MQTT_URL", "mqtts://dev%40ice:s3cr%2Ft@broker.example:8883")
    monkeypatch.setenv("PIPELINE_NATS_URL", "nats://a:4222, nats://b:4222")
    monkeypatch.setenv("PIPELINE_WINDOW_GRACE_SECONDS", "5")
    monkeypatch.setenv("PIPELINE_LOG_FORMAT", "console")
    s = Settings(_env_file=None)
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.tls) == ("broker.example", 8883, True)
    assert (s.mqtt.username, s.mqtt.password) == ("dev@ice", "s3cr/t")
    assert "s3cr" not in repr(s.mqtt)
    assert s.nats_servers == ["nats://a:4222", "nats://b:4222"]
    assert s.grace.total_seconds() == 5
    assert s.log_format == "console"


def test_unsupported_mqtt_scheme_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_MQTT_URL", "http://broker:1883")
    with pytest.raises(ValueError, match="scheme"):
        Settings(_env_file=None)


def test_passwords_are_redacted_for_logs() -> None:
    assert redact("postgresql://app:hunter2@db:5432/zev") == "postgresql://app:***@db:5432/zev"
    assert redact("postgresql://postgres@db/zev") == "postgresql://postgres@db/zev"


def test_stream_replicas_reach_every_stream_config(monkeypatch) -> None:
    """PIPELINE_STREAM_REPLICAS=3 (a 3-node cluster, deploy/nats/cluster) gives every stream
    three replicas; one by default."""
    from pipeline.config import Settings
    from pipeline.topology import STREAMS

    monkeypatch.setenv("PIPELINE_STREAM_REPLICAS", "3")
    policy = Settings().streams
    assert {s.config(policy).num_replicas for s in STREAMS} == {3}
    assert {s.config().num_replicas for s in STREAMS} == {1}


def test_stream_retention_days_set_the_max_age_of_the_streams_that_keep_history(
    monkeypatch,
) -> None:
    from pipeline.config import Settings
    from pipeline.topology import STREAMS

    monkeypatch.setenv("PIPELINE_DLQ_RETENTION_DAYS", "3")
    monkeypatch.setenv("PIPELINE_MESSWERTE_RETENTION_DAYS", "30.5")
    monkeypatch.setenv("PIPELINE_BESS_INTERVALS_RETENTION_DAYS", "90")
    ages = {s.name: s.config(Settings().streams).max_age for s in STREAMS}
    day = 86_400
    assert ages["DLQ"] == 3 * day
    assert ages["MESSWERTE"] == 30.5 * day
    assert ages["BESS_INTERVALS"] == 90 * day
    assert ages["INGEST"] == 7 * day  # work queues keep their own bound


def test_raw_retention_is_unset_by_default_and_must_be_positive(monkeypatch) -> None:
    import pydantic

    from pipeline.config import Settings

    assert Settings().raw_retention is None
    monkeypatch.setenv("PIPELINE_RAW_RETENTION_DAYS", "0")
    with pytest.raises(pydantic.ValidationError):
        Settings()
