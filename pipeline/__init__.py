"""Runtime of the messwerte pipeline: configuration, CLI, JetStream topology and stage runners,
the MQTT bridge, the outbox publisher, the embedded dev stack, HTTP health/metrics, logging and
database migrations."""
