"""Database schema (design §4) and its idempotent upgrades, applied by `pipeline migrate`.

Each step runs once, in order, in its own transaction, recorded in `pipeline_schema_migrations`;
an advisory lock lets several workers migrate at start-up without racing. Every statement is
also safe on its own against a database where the ZEV system already created `einheit` and
`messwerte`.
"""

from __future__ import annotations

import asyncpg
import structlog

log = structlog.get_logger("pipeline.migrations")

_LOCK_KEY = 7_341_115_001  # arbitrary, constant: serialises concurrent `migrate` runs

CONTRACT_SCHEMA = """
CREATE TABLE IF NOT EXISTS einheit (
    id BIGINT PRIMARY KEY,
    organization_id UUID NOT NULL
);
CREATE TABLE IF NOT EXISTS zaehler_rohdaten (
    id BIGSERIAL PRIMARY KEY,
    einheit_id BIGINT NOT NULL REFERENCES einheit(id),
    organization_id UUID NOT NULL,
    timestamp TIMESTAMP WITH TIME ZONE NOT NULL,
    verbrauch DECIMAL(12,4) NOT NULL,
    einspeisung DECIMAL(12,4) NOT NULL,
    zaehlerstand_verbrauch DECIMAL(12,4),
    zaehlerstand_einspeisung DECIMAL(12,4),
    empfangen_am TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    verarbeitet BOOLEAN DEFAULT FALSE,
    verarbeitet_am TIMESTAMP WITH TIME ZONE,
    CONSTRAINT uk_zaeher_rohdaten UNIQUE (einheit_id, timestamp)
);
CREATE INDEX IF NOT EXISTS idx_zaeher_rohdaten_unverarbeitet
    ON zaehler_rohdaten(verarbeitet, timestamp) WHERE verarbeitet = FALSE;
CREATE TABLE IF NOT EXISTS messwerte (
    id BIGSERIAL PRIMARY KEY,
    einheit_id BIGINT NOT NULL REFERENCES einheit(id),
    zeit TIMESTAMP WITH TIME ZONE NOT NULL,
    verbrauch DECIMAL(12,4) NOT NULL,
    einspeisung DECIMAL(12,4) NOT NULL,
    UNIQUE (einheit_id, zeit)
);
ALTER TABLE messwerte ADD COLUMN IF NOT EXISTS quelle VARCHAR(20) DEFAULT 'CSV';
"""

PIPELINE_SCHEMA = """
-- An existing `messwerte` may lack the unique key the upsert needs; add it only if missing.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i
        JOIN pg_class t ON t.oid = i.indrelid
        WHERE t.relname = 'messwerte' AND t.relnamespace = 'public'::regnamespace
          AND i.indisunique
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
               FROM unnest(i.indkey) k JOIN pg_attribute a
                 ON a.attrelid = t.oid AND a.attnum = k) = ARRAY['einheit_id', 'zeit']
    ) THEN
        CREATE UNIQUE INDEX messwerte_einheit_zeit_uk ON messwerte (einheit_id, zeit);
    END IF;
END $$;

-- How many raw readings an aggregate summed, and how often it changed (0 = never published).
ALTER TABLE messwerte ADD COLUMN IF NOT EXISTS anzahl_rohwerte INTEGER;
ALTER TABLE messwerte ADD COLUMN IF NOT EXISTS revision INTEGER NOT NULL DEFAULT 0;

-- End of the 15-minute interval (end - 15 min, end] holding ts: ts rounded up to the quarter.
CREATE OR REPLACE FUNCTION messwerte_interval_end(ts TIMESTAMPTZ) RETURNS TIMESTAMPTZ
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN b = ts THEN ts ELSE b + INTERVAL '15 minutes' END
    FROM date_bin(INTERVAL '15 minutes', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b
$$;

-- Transactional outbox: written in the transaction that changes `messwerte`, emptied by the
-- publisher once JetStream has stored the message. Nothing is published that the database
-- does not hold, and nothing held is left unpublished.
CREATE TABLE IF NOT EXISTS messwerte_outbox (
    id BIGSERIAL PRIMARY KEY,
    einheit_id BIGINT NOT NULL,
    organization_id UUID NOT NULL,
    zeit TIMESTAMPTZ NOT NULL,
    verbrauch DECIMAL(12,4) NOT NULL,
    einspeisung DECIMAL(12,4) NOT NULL,
    anzahl_rohwerte INTEGER NOT NULL,
    quelle VARCHAR(20) NOT NULL,
    revision INTEGER NOT NULL,
    erstellt_am TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE OR REPLACE FUNCTION messwerte_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('messwerte_outbox', '');
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS messwerte_outbox_notify ON messwerte_outbox;
CREATE TRIGGER messwerte_outbox_notify AFTER INSERT ON messwerte_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION messwerte_outbox_notify();
"""

RAW_SOURCE = """
-- Where a raw reading came from ('MQTT' or 'CSV'): an interval is 'CSV' only if all its rows are.
ALTER TABLE zaehler_rohdaten ADD COLUMN IF NOT EXISTS quelle VARCHAR(20) NOT NULL DEFAULT 'MQTT';
"""

BROKER_ORDER = """
-- The INGEST sequence of the reading a row holds. With empfangen_am it is the broker order
-- persist compares, so a redelivery that arrives after a newer reading cannot overwrite it.
ALTER TABLE zaehler_rohdaten ADD COLUMN IF NOT EXISTS ingest_seq BIGINT NOT NULL DEFAULT 0;
"""

BESS = """
-- Design §13. Devices are registered by the operator; the pipeline only reads them.
CREATE TABLE IF NOT EXISTS bess_device (
    site TEXT,
    device TEXT,
    organization_id UUID NOT NULL,
    PRIMARY KEY (site, device)
);
CREATE TABLE IF NOT EXISTS bess_telemetry (
    id BIGSERIAL PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    organization_id UUID NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    soc DOUBLE PRECISION NOT NULL,
    p DOUBLE PRECISION NOT NULL,
    p_ch DOUBLE PRECISION,
    p_dis DOUBLE PRECISION,
    v_dc DOUBLE PRECISION,
    i_dc DOUBLE PRECISION,
    t_cell_max DOUBLE PRECISION,
    soh DOUBLE PRECISION,
    alarms TEXT[] NOT NULL DEFAULT '{}',
    empfangen_am TIMESTAMPTZ DEFAULT NOW(),
    quelle VARCHAR(20) NOT NULL DEFAULT 'MQTT',
    verarbeitet BOOLEAN DEFAULT FALSE,
    verarbeitet_am TIMESTAMPTZ,
    -- Broker order of the sample a row holds, as zaehler_rohdaten.ingest_seq.
    ingest_seq BIGINT NOT NULL DEFAULT 0,
    UNIQUE (site, device, ts)
);
CREATE INDEX IF NOT EXISTS idx_bess_telemetry_unverarbeitet
    ON bess_telemetry (verarbeitet, ts) WHERE verarbeitet = FALSE;
CREATE TABLE IF NOT EXISTS bess_interval (
    site TEXT,
    device TEXT,
    organization_id UUID NOT NULL,
    interval_end TIMESTAMPTZ,
    energy_charged_kwh NUMERIC(12,4) NOT NULL,
    energy_discharged_kwh NUMERIC(12,4) NOT NULL,
    covered_seconds INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    soc_min DOUBLE PRECISION,
    soc_max DOUBLE PRECISION,
    soc_last DOUBLE PRECISION,
    t_cell_max DOUBLE PRECISION,
    soh_last DOUBLE PRECISION,
    alarms TEXT[] NOT NULL DEFAULT '{}',
    revision INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (site, device, interval_end)
);
-- Intervals a new or changed sample may have changed: persist marks them in the statement that
-- stores the sample, the aggregator computes each once it is closed and removes the mark in
-- the transaction that stores the result. Finding the due ones is an index range scan, however
-- many samples wait in open intervals.
CREATE TABLE IF NOT EXISTS bess_interval_dirty (
    site TEXT,
    device TEXT,
    interval_end TIMESTAMPTZ,
    marked_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (site, device, interval_end)
);
CREATE INDEX IF NOT EXISTS idx_bess_interval_dirty_end ON bess_interval_dirty (interval_end);
-- Transactional outbox of BESS intervals, as messwerte_outbox.
CREATE TABLE IF NOT EXISTS bess_interval_outbox (
    id BIGSERIAL PRIMARY KEY,
    body JSONB NOT NULL,
    erstellt_am TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE OR REPLACE FUNCTION bess_interval_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bess_interval_outbox', '');
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bess_interval_outbox_notify ON bess_interval_outbox;
CREATE TRIGGER bess_interval_outbox_notify AFTER INSERT ON bess_interval_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION bess_interval_outbox_notify();
"""

API = """
-- Design §12: API tokens, one organization each; only the SHA-256 of a token is kept.
CREATE TABLE IF NOT EXISTS api_token (
    name TEXT PRIMARY KEY,
    organization_id UUID NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_used_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);
-- GET /api/last: an organization's newest samples, by ts.
CREATE INDEX IF NOT EXISTS idx_bess_telemetry_org_ts ON bess_telemetry (organization_id, ts DESC);
"""

FLEET = """
-- Closed intervals to sum, as bess_interval_dirty: persist marks the interval of every new or
-- changed raw row in the statement that stores it, the aggregator removes the mark in the
-- transaction that sums the interval. Finding what is due is an index range scan, however many
-- rows wait in open intervals; a sweep that finds nothing due costs the same at any fleet size.
CREATE TABLE IF NOT EXISTS messwerte_interval_dirty (
    einheit_id BIGINT,
    zeit TIMESTAMPTZ,
    marked_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (einheit_id, zeit)
);
CREATE INDEX IF NOT EXISTS idx_messwerte_interval_dirty_zeit
    ON messwerte_interval_dirty (zeit, einheit_id);
-- Rows stored before this step: their intervals are due as they were before.
INSERT INTO messwerte_interval_dirty (einheit_id, zeit)
SELECT DISTINCT einheit_id, messwerte_interval_end(timestamp) FROM zaehler_rohdaten
WHERE verarbeitet IS NOT TRUE
ON CONFLICT DO NOTHING;
-- The due BESS marks in the order they are taken, without sorting all of them per chunk.
CREATE INDEX IF NOT EXISTS idx_bess_interval_dirty_due
    ON bess_interval_dirty (interval_end, site, device);
DROP INDEX IF EXISTS idx_bess_interval_dirty_end;
-- Retention (`pipeline prune`): processed rows by time. A raw row enters these indexes when it
-- is summed (that update is not HOT anyway), so storing a reading costs no more than before.
CREATE INDEX IF NOT EXISTS idx_zaehler_rohdaten_verarbeitet_ts
    ON zaehler_rohdaten (timestamp) WHERE verarbeitet = TRUE;
CREATE INDEX IF NOT EXISTS idx_bess_telemetry_verarbeitet_ts
    ON bess_telemetry (ts) WHERE verarbeitet = TRUE;
"""

FENCE = """
-- Who may write as a singleton (design §14): the outbox publisher that took over writes its
-- holder here, and every batch of a publisher checks it under a shared row lock. Taking over
-- waits for the batches of the one before it to end, and a batch of a holder that lost its
-- claim sees another name and stops before it publishes.
CREATE TABLE IF NOT EXISTS pipeline_fence (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    taken_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
"""

#: Ordered steps; append, never edit a step that has shipped.
STEPS: tuple[tuple[int, str, str], ...] = (
    (1, "contract tables of design §4", CONTRACT_SCHEMA),
    (2, "revision, interval function, outbox", PIPELINE_SCHEMA),
    (3, "source of each raw reading", RAW_SOURCE),
    (4, "broker order of each raw reading", BROKER_ORDER),
    (5, "BESS devices, telemetry, intervals and their outbox", BESS),
    (6, "API tokens; an index for the newest samples of an organization", API),
    (7, "due-interval marks for meters; indexes for due BESS marks and for retention", FLEET),
    (8, "fence of the singletons that write to the database", FENCE),
)


async def migrate(dsn: str) -> list[int]:
    """Apply every step not yet applied; return the versions applied now."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    applied: list[int] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS pipeline_schema_migrations (
                    version INTEGER PRIMARY KEY,
                    description TEXT NOT NULL,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())"""
            )
            done = {
                r["version"]
                for r in await conn.fetch("SELECT version FROM pipeline_schema_migrations")
            }
            for version, description, sql in STEPS:
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO pipeline_schema_migrations (version, description) VALUES ($1, $2)",
                    version,
                    description,
                )
                applied.append(version)
                log.info("migration applied", version=version, description=description)
    finally:
        await conn.close()
    return applied
