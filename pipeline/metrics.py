"""Prometheus metrics of one worker process (design §9), on a registry of its own.

The `zev_*` names are the contract; the `pipeline_stage_*` family is per stage. A registry per
`Metrics` keeps several pipelines in one process (tests, the demo) from sharing counters.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from schemas.bess import BessSample

_BATCH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.mqtt_received = Counter(
            "zev_mqtt_messages_received_total", "MQTT messages received by the bridge", registry=r
        )
        self.mqtt_processed = Counter(
            "zev_mqtt_messages_processed_total",
            "Messages that passed validation (duplicates included)",
            registry=r,
        )
        self.mqtt_failed = Counter(
            "zev_mqtt_messages_failed_total", "Messages rejected to dlq.>", registry=r
        )
        self.mqtt_last_message = Gauge(
            "zev_mqtt_last_message_timestamp",
            "Unix time of the last MQTT message received",
            registry=r,
        )
        self.rejects = Counter(
            "pipeline_rejects_total", "Rejected messages by reason", ["reason"], registry=r
        )
        self.aggregation_runs = Counter(
            "zev_aggregation_runs_total", "Aggregation runs", registry=r
        )
        self.aggregation_failures = Counter(
            "pipeline_aggregation_failures_total", "Aggregation runs that failed", registry=r
        )
        self.raw_rows_pruned = Counter(
            "pipeline_raw_rows_pruned_total",
            "Processed raw rows deleted by retention (PIPELINE_RAW_RETENTION_DAYS)",
            ["table"],
            registry=r,
        )
        self.aggregation_records = Counter(
            "zev_aggregation_records_processed_total",
            "Raw rows newly taken over into messwerte",
            registry=r,
        )
        self.aggregation_duration = Histogram(
            "zev_aggregation_duration_seconds", "Duration of an aggregation run", registry=r
        )
        self.aggregation_last_run = Gauge(
            "zev_aggregation_last_run_timestamp",
            "Unix time of the last aggregation run",
            registry=r,
        )
        self.stage_in = Counter(
            "pipeline_stage_messages_in_total", "Messages into a stage", ["stage"], registry=r
        )
        self.stage_out = Counter(
            "pipeline_stage_messages_out_total",
            "Messages out of a stage by outcome",
            ["stage", "outcome"],
            registry=r,
        )
        self.stage_batch_latency = Histogram(
            "pipeline_stage_batch_seconds",
            "Time to process one batch, from fetch to ack",
            ["stage"],
            buckets=_BATCH_BUCKETS_S,
            registry=r,
        )
        self.consumer_pending = Gauge(
            "pipeline_consumer_pending_messages",
            "Messages in the stage's JetStream consumer not yet delivered (lag)",
            ["stage"],
            registry=r,
        )
        self.retry_queue_depth = Gauge(
            "pipeline_retry_queue_depth",
            "Messages held in memory waiting for a retry",
            ["stage"],
            registry=r,
        )
        self.published = Counter(
            "pipeline_messwerte_published_total", "Messages published on messwerte.>", registry=r
        )
        self.published_bess = Counter(
            "pipeline_bess_intervals_published_total",
            "Messages published on intervals.bess.>",
            registry=r,
        )
        # BESS (design §13): the latest sample per device, by ts.
        device = ["site", "device"]
        self.bess_soc = Gauge("bess_soc_percent", "State of charge, %", device, registry=r)
        self.bess_power = Gauge(
            "bess_power_kw", "Total power, kW, negative = charging", device, registry=r
        )
        self.bess_cell_temperature = Gauge(
            "bess_cell_temperature_max_celsius", "Highest cell temperature, °C", device, registry=r
        )
        self.bess_alarms = Gauge("bess_alarms_active", "Alarms active", device, registry=r)
        self.bess_last_telemetry = Gauge(
            "bess_last_telemetry_timestamp_seconds",
            "Unix time (ts) of the latest sample",
            device,
            registry=r,
        )
        self.bess_plausibility = Counter(
            "bess_plausibility_warnings_total",
            "Samples stored despite a failed plausibility check",
            ["check"],
            registry=r,
        )
        self._latest_ts: dict[tuple[str, str], datetime] = {}
        #: The counter of messages published from each outbox table.
        self.published_from = {
            "messwerte_outbox": self.published,
            "bess_interval_outbox": self.published_bess,
        }
        # The HTTP ingest API (design §12).
        self.api_requests = Counter(
            "pipeline_api_requests_total",
            "Ingest API requests by path and status",
            ["path", "status"],
            registry=r,
        )
        self.api_items = Counter(
            "pipeline_api_items_total",
            "Items posted to the ingest API by path and outcome (accepted, rejected)",
            ["path", "outcome"],
            registry=r,
        )
        self.api_request_seconds = Histogram(
            "pipeline_api_request_seconds",
            "Ingest API request duration, answer stored included",
            buckets=_BATCH_BUCKETS_S,
            registry=r,
        )

    def validated(self, message: Any) -> None:
        """What a message that passed validation tells the operator beyond being counted."""
        if not isinstance(message, BessSample):
            return
        for check in message.warnings:
            self.bess_plausibility.labels(check).inc()
        device = (message.site, message.device)
        if message.ts < self._latest_ts.get(device, message.ts):
            return  # a late or backfilled sample: the gauges show the newest one
        self._latest_ts[device] = message.ts
        self.bess_soc.labels(*device).set(message.soc)
        self.bess_power.labels(*device).set(message.p)
        if message.t_cell_max is not None:
            self.bess_cell_temperature.labels(*device).set(message.t_cell_max)
        self.bess_alarms.labels(*device).set(len(message.alarms))
        self.bess_last_telemetry.labels(*device).set(message.ts.timestamp())

    def render(self) -> bytes:
        return generate_latest(self.registry)
