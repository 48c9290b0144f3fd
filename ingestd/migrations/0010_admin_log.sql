-- The audit log of administrative changes: every insert, update and delete on meters and
-- meter_keys (and a TRUNCATE of either; billing_statements too, once it exists:
-- ingestd/roles.py) is recorded by a trigger in admin_log, which nobody can change
-- afterwards short of a superuser or the tables' owner disabling its triggers. The most
-- dangerous attack on a metering head-end is not a forged message but an insider who
-- registers an attacker's key for a meter: it must leave a trace.
-- Safe to run twice.

CREATE TABLE IF NOT EXISTS admin_log (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    logged_at        timestamptz NOT NULL,
    -- current_user: the role whose privileges made the change (after any SET ROLE).
    db_role          text NOT NULL,
    -- session_user: the role that logged in.
    session_role     text NOT NULL,
    application_name text NOT NULL,
    client_addr      inet,
    action           text NOT NULL CHECK (action IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    table_name       text NOT NULL,
    -- The row's key: the kid in meter_keys, the meter id in meters.
    row_key          text,
    meter_id         text,
    old_values       jsonb,
    new_values       jsonb,
    transaction_id   bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS admin_log_meter ON admin_log (meter_id, id);

-- Who, when and from where are filled in here, whatever an insert says, and only a
-- trigger's insert is accepted (depth 2: this trigger fired by one on a logged table): a
-- role allowed to change meters cannot write a log line of its own making.
CREATE OR REPLACE FUNCTION ingestd_admin_log_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'admin_log is written by triggers only'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.logged_at := clock_timestamp();
    NEW.db_role := current_user;
    NEW.session_role := session_user;
    NEW.application_name := current_setting('application_name');
    NEW.client_addr := inet_client_addr();
    NEW.transaction_id := txid_current();
    RETURN NEW;
END;
$$;
DROP TRIGGER IF EXISTS admin_log_stamp ON admin_log;
CREATE TRIGGER admin_log_stamp BEFORE INSERT ON admin_log
    FOR EACH ROW EXECUTE FUNCTION ingestd_admin_log_stamp();

-- Append-only, for everyone but a superuser (who can disable triggers): docs/security.md.
CREATE OR REPLACE FUNCTION ingestd_admin_log_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'admin_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
DROP TRIGGER IF EXISTS admin_log_immutable ON admin_log;
CREATE TRIGGER admin_log_immutable BEFORE UPDATE OR DELETE ON admin_log
    FOR EACH ROW EXECUTE FUNCTION ingestd_admin_log_immutable();
DROP TRIGGER IF EXISTS admin_log_no_truncate ON admin_log;
CREATE TRIGGER admin_log_no_truncate BEFORE TRUNCATE ON admin_log
    FOR EACH STATEMENT EXECUTE FUNCTION ingestd_admin_log_immutable();

-- The logging trigger. SECURITY INVOKER (the default), so that current_user is the role
-- that made the change; that role needs INSERT on admin_log (ingestd_admin has it), and
-- the stamp trigger above refuses every insert not made from here.
-- TG_ARGV[0] names the key column of the table.
CREATE OR REPLACE FUNCTION ingestd_admin_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_row jsonb := CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END;
    new_row jsonb := CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END;
    changed jsonb := COALESCE(new_row, old_row);
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        INSERT INTO admin_log (logged_at, db_role, session_role, application_name, action,
                               table_name, transaction_id)
        VALUES (now(), '', '', '', TG_OP, TG_TABLE_NAME, 0);
        RETURN NULL;
    END IF;
    INSERT INTO admin_log (logged_at, db_role, session_role, application_name, action, table_name,
                           row_key, meter_id, old_values, new_values, transaction_id)
    VALUES (now(), '', '', '', TG_OP, TG_TABLE_NAME, changed ->> TG_ARGV[0], changed ->> 'meter_id',
            old_row, new_row, 0);
    -- A key moved from one meter to another is in both meters' history.
    IF TG_OP = 'UPDATE' AND (old_row ->> 'meter_id') IS DISTINCT FROM (new_row ->> 'meter_id') THEN
        INSERT INTO admin_log (logged_at, db_role, session_role, application_name, action, table_name,
                               row_key, meter_id, old_values, new_values, transaction_id)
        VALUES (now(), '', '', '', TG_OP, TG_TABLE_NAME, changed ->> TG_ARGV[0], old_row ->> 'meter_id',
                old_row, new_row, 0);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS meters_admin_log ON meters;
CREATE TRIGGER meters_admin_log AFTER INSERT OR UPDATE OR DELETE ON meters
    FOR EACH ROW EXECUTE FUNCTION ingestd_admin_log_change('meter_id');
DROP TRIGGER IF EXISTS meters_admin_log_truncate ON meters;
CREATE TRIGGER meters_admin_log_truncate AFTER TRUNCATE ON meters
    FOR EACH STATEMENT EXECUTE FUNCTION ingestd_admin_log_change('meter_id');
DROP TRIGGER IF EXISTS meter_keys_admin_log ON meter_keys;
CREATE TRIGGER meter_keys_admin_log AFTER INSERT OR UPDATE OR DELETE ON meter_keys
    FOR EACH ROW EXECUTE FUNCTION ingestd_admin_log_change('kid');
DROP TRIGGER IF EXISTS meter_keys_admin_log_truncate ON meter_keys;
CREATE TRIGGER meter_keys_admin_log_truncate AFTER TRUNCATE ON meter_keys
    FOR EACH STATEMENT EXECUTE FUNCTION ingestd_admin_log_change('kid');
