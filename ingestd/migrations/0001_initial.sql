-- ingestd schema, version 1: meters and their keys, readings, events, the raw signed
-- messages (audit trail), the per-message ledger that makes storage exactly-once, and
-- the quarantine of rejected messages. Every statement is safe to run twice.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE IF NOT EXISTS meters (
    meter_id      text PRIMARY KEY CHECK (meter_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    site          text,
    interval_s    integer NOT NULL DEFAULT 900 CHECK (interval_s > 0),
    registered_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS meter_keys (
    kid         text PRIMARY KEY CHECK (kid ~ '^[!-~]{1,128}$'),
    meter_id    text NOT NULL REFERENCES meters (meter_id) ON DELETE CASCADE,
    alg         text NOT NULL CHECK (alg IN ('RS256', 'PS256', 'ES256', 'EdDSA', 'DS256')),
    public_key  text NOT NULL,  -- SubjectPublicKeyInfo PEM, checked for type and size on entry
    valid_from  timestamptz NOT NULL DEFAULT now(),
    valid_until timestamptz,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (valid_until IS NULL OR valid_until > valid_from)
);
CREATE INDEX IF NOT EXISTS meter_keys_meter ON meter_keys (meter_id);

-- A running daemon learns of new, rotated and revoked keys within a second.
CREATE OR REPLACE FUNCTION ingestd_notify_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ingestd_keys', COALESCE(NEW.kid, OLD.kid));
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS meter_keys_notify ON meter_keys;
CREATE TRIGGER meter_keys_notify AFTER INSERT OR UPDATE OR DELETE ON meter_keys
    FOR EACH ROW EXECUTE FUNCTION ingestd_notify_key_change();

-- One row per message ever accepted: the authority on duplicates. A plain table, not a
-- hypertable, because TimescaleDB requires the time column in every unique index of a
-- hypertable, and (meter, epoch, seq) must be unique across all time.
CREATE TABLE IF NOT EXISTS message_seqs (
    meter_id    text NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    digest      bytea NOT NULL,  -- SHA-256 of the readings and events, to tell a replay from a conflict
    received_at timestamptz NOT NULL,
    PRIMARY KEY (meter_id, epoch, seq)
);

CREATE TABLE IF NOT EXISTS readings (
    meter_id    text NOT NULL,
    time        timestamptz NOT NULL,  -- end of the metering interval
    import_wh   bigint NOT NULL,
    export_wh   bigint,
    extra       jsonb,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    received_at timestamptz NOT NULL
);
SELECT create_hypertable('readings', 'time', chunk_time_interval => INTERVAL '7 days',
                         if_not_exists => TRUE);
CREATE UNIQUE INDEX IF NOT EXISTS readings_meter_time ON readings (meter_id, time);

CREATE TABLE IF NOT EXISTS events (
    meter_id    text NOT NULL,
    time        timestamptz NOT NULL,
    code        text NOT NULL CHECK (code ~ '^[0-9]{3}$'),
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    received_at timestamptz NOT NULL
);
SELECT create_hypertable('events', 'time', chunk_time_interval => INTERVAL '30 days',
                         if_not_exists => TRUE);
CREATE UNIQUE INDEX IF NOT EXISTS events_identity ON events (meter_id, time, code, epoch, seq);
CREATE INDEX IF NOT EXISTS events_code_time ON events (code, time DESC);

-- The exact bytes of every accepted message, so a disputed reading can be re-verified.
CREATE TABLE IF NOT EXISTS raw_messages (
    meter_id    text NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    received_at timestamptz NOT NULL,
    sent        timestamptz NOT NULL,
    replay      boolean NOT NULL,
    kid         text NOT NULL,
    topic       text NOT NULL,
    payload     bytea NOT NULL
);
SELECT create_hypertable('raw_messages', 'received_at', chunk_time_interval => INTERVAL '7 days',
                         if_not_exists => TRUE);
CREATE INDEX IF NOT EXISTS raw_messages_meter_seq ON raw_messages (meter_id, epoch, seq, received_at);

-- Rejected messages, kept for investigation (tampering, misconfigured meters).
CREATE TABLE IF NOT EXISTS quarantine (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL,
    reason       text NOT NULL,
    detail       text NOT NULL,
    topic        text NOT NULL,
    meter_id     text,      -- as the topic claims it: unverified
    kid          text,      -- as the header claims it: unverified
    payload      bytea NOT NULL,  -- capped at ingest.quarantine_payload_max bytes
    payload_size integer NOT NULL
);
CREATE INDEX IF NOT EXISTS quarantine_time ON quarantine (received_at);
CREATE INDEX IF NOT EXISTS quarantine_reason_time ON quarantine (reason, received_at);

-- The community (timescale-licensed) edition adds compression and retention; the Apache
-- edition (Debian's package) has neither, and gets plain hypertables.
DO $$
BEGIN
    IF current_setting('timescaledb.license', true) = 'timescale' THEN
        ALTER TABLE readings SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'meter_id', timescaledb.compress_orderby = 'time');
        ALTER TABLE events SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'meter_id',
            timescaledb.compress_orderby = 'time, code, epoch, seq');
        ALTER TABLE raw_messages SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'meter_id',
            timescaledb.compress_orderby = 'received_at, epoch, seq');
        -- Older than the meters' 90-day flash: no replay can touch these chunks any more.
        PERFORM add_compression_policy('readings', INTERVAL '100 days', if_not_exists => TRUE);
        PERFORM add_compression_policy('events', INTERVAL '100 days', if_not_exists => TRUE);
        PERFORM add_compression_policy('raw_messages', INTERVAL '30 days', if_not_exists => TRUE);
        -- Readings and events are billing records and are kept; the raw audit copies are
        -- kept for the usual seven-year records period.
        PERFORM add_retention_policy('raw_messages', INTERVAL '7 years', if_not_exists => TRUE);
    END IF;
END;
$$;
