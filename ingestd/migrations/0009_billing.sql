-- Billing periods: the service size of a meter, frozen statements, adjustments.
-- Safe to run twice.

-- The service size in W (the breaker's rating): an interval whose energy is above what
-- this power could deliver in it is a spike to review. NULL: no spike check.
ALTER TABLE meters ADD COLUMN IF NOT EXISTS max_power_w bigint CHECK (max_power_w > 0);

-- Which readings arrived from flash: the billing report counts them apart. Partial, so
-- that the live messages (nearly all of them) cost the batch write nothing but the test
-- of the predicate.
CREATE INDEX IF NOT EXISTS raw_messages_replayed ON raw_messages (meter_id, epoch, seq) WHERE replay;

-- One row per meter and closed period, written once by `ingestd billing close`.
CREATE TABLE IF NOT EXISTS billing_statements (
    period                 text NOT NULL CHECK (period ~ '^[0-9]{4}-[0-9]{2}$'),
    meter_id               text NOT NULL REFERENCES meters (meter_id),
    site                   text,
    period_start           timestamptz NOT NULL,
    period_end             timestamptz NOT NULL,
    status                 text NOT NULL CHECK (status IN ('ready', 'estimated', 'pending', 'review')),
    open_import_wh         bigint,
    close_import_wh        bigint,
    consumption_import_wh  bigint,
    open_export_wh         bigint,
    close_export_wh        bigint,
    consumption_export_wh  bigint,
    expected               integer NOT NULL,
    actual                 integer NOT NULL,
    replayed               integer NOT NULL,
    missing_recoverable    integer NOT NULL,
    missing_lost           integer NOT NULL,
    power_off              integer NOT NULL,
    flags                  jsonb NOT NULL,
    -- How each boundary was obtained (read, estimated, first_read, missing) and the
    -- (meter, epoch, seq) of the messages that carried the readings used.
    open_source            jsonb NOT NULL,
    close_source           jsonb NOT NULL,
    -- The canonical JSON of the whole statement, and its SHA-256: a copy kept elsewhere
    -- (the invoice) can be checked against it.
    statement              jsonb NOT NULL,
    digest                 bytea NOT NULL CHECK (length(digest) = 32),
    closed_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (period, meter_id)
);

-- What an invoice was based on is never rewritten: later data becomes an adjustment.
CREATE OR REPLACE FUNCTION ingestd_billing_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: a closed statement is never changed', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
DROP TRIGGER IF EXISTS billing_statements_append_only ON billing_statements;
CREATE TRIGGER billing_statements_append_only BEFORE UPDATE OR DELETE ON billing_statements
    FOR EACH ROW EXECUTE FUNCTION ingestd_billing_append_only();

-- A closed figure that later data changed: the operator's list of re-bills. One row per
-- change (a figure that changes twice has two rows, the second from the first's value).
CREATE TABLE IF NOT EXISTS billing_adjustments (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    period      text NOT NULL,
    meter_id    text NOT NULL,
    field       text NOT NULL,
    old_value   text,
    new_value   text,
    -- The (meter, epoch, seq) of the messages whose readings gave the new value.
    caused_by   jsonb NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    -- Set when the operator has re-billed it (`ingestd billing adjustments --mark-billed`).
    billed_at   timestamptz,
    FOREIGN KEY (period, meter_id) REFERENCES billing_statements (period, meter_id)
);
CREATE INDEX IF NOT EXISTS billing_adjustments_statement ON billing_adjustments (period, meter_id, field, id);
CREATE INDEX IF NOT EXISTS billing_adjustments_unbilled ON billing_adjustments (period) WHERE billed_at IS NULL;
