-- Meter health: event codes, flags (ok / gray / red / never), the meter_health view for
-- Grafana and `ingestd status`, and the indexes behind isolation checks. Safe to run twice.

-- The event code table, for dashboards (names of codes, which are tampering). Its source
-- is ingestd/events.py; a test checks that the two agree.
CREATE TABLE IF NOT EXISTS event_codes (
    code    text PRIMARY KEY CHECK (code ~ '^[0-9]{3}$'),
    name    text NOT NULL,
    meaning text NOT NULL,
    tamper  boolean NOT NULL
);
INSERT INTO event_codes (code, name, meaning, tamper) VALUES
    ('001', 'power_loss', 'power loss', false),
    ('002', 'power_restored', 'power restored', false),
    ('003', 'meter_cover_opened', 'meter cover opened (light sensor)', true),
    ('004', 'meter_cover_closed', 'meter cover closed', false),
    ('005', 'programming_switch_enabled', 'programming switch enabled', true),
    ('006', 'programming_switch_disabled', 'programming switch disabled', false),
    ('007', 'admin_auth_failure', 'administrative authentication failure', true),
    ('008', 'settings_changed', 'settings changed', false),
    ('009', 'clock_adjusted', 'clock adjusted', false),
    ('010', 'replay_range_unavailable', 'replay range unavailable (backfill issue)', false),
    ('011', 'comm_module_replaced', 'communication module restarted or replaced', true),
    ('012', 'flash_near_capacity', 'flash storage near capacity', false),
    ('013', 'terminal_cover_opened', 'terminal cover opened', true),
    ('014', 'magnetic_field', 'strong magnetic field detected', true),
    ('015', 'event_log_cleared', 'event log cleared', true)
ON CONFLICT (code) DO UPDATE
    SET name = EXCLUDED.name, meaning = EXCLUDED.meaning, tamper = EXCLUDED.tamper;

-- The flag thresholds the view uses: one row, written by the daemon from its [flags]
-- configuration at start-up, so that Grafana sees the flags the daemon counts.
CREATE TABLE IF NOT EXISTS health_settings (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    gray_after interval NOT NULL,
    red_after  interval NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (red_after > gray_after)
);
INSERT INTO health_settings (gray_after, red_after) VALUES (INTERVAL '48 hours', INTERVAL '7 days')
ON CONFLICT (id) DO NOTHING;

-- Isolation checks count the other meters of a site.
CREATE INDEX IF NOT EXISTS meters_site ON meters (site);
-- The last tamper event of a meter. The list of codes must stay the same as in
-- meter_health_at below (the planner uses a partial index only for the same predicate).
CREATE INDEX IF NOT EXISTS events_tamper ON events (meter_id, time DESC)
    WHERE code IN ('003', '005', '007', '011', '013', '014', '015');
-- Power losses not yet classified as isolated or site-wide: the classifier's work list.
CREATE INDEX IF NOT EXISTS events_unclassified_power_loss ON events (time)
    WHERE code = '001' AND NOT (detail ? 'isolated');

-- One place for the flag rule. Silent for exactly gray_after is still ok.
CREATE OR REPLACE FUNCTION meter_flag(last_seen timestamptz, as_of timestamptz,
                                      gray_after interval, red_after interval)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN last_seen IS NULL THEN 'never'
        WHEN as_of - last_seen > red_after THEN 'red'
        WHEN as_of - last_seen > gray_after THEN 'gray'
        ELSE 'ok'
    END
$$;

-- Health of every registered meter as of `as_of` (tests inject the time). Thresholds left
-- NULL come from health_settings. A plain SQL function, so the planner inlines it and a
-- filter on the view (WHERE site = ...) reaches the tables.
CREATE OR REPLACE FUNCTION meter_health_at(as_of timestamptz,
                                           gray_after interval DEFAULT NULL,
                                           red_after interval DEFAULT NULL)
RETURNS TABLE (meter_id text, site text, last_seen timestamptz, flag text,
               open_gaps bigint, missing_seqs bigint,
               last_tamper_code text, last_tamper_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT m.meter_id, m.site, s.last_seen,
           meter_flag(s.last_seen, as_of,
                      COALESCE(gray_after, (SELECT h.gray_after FROM health_settings h)),
                      COALESCE(red_after, (SELECT h.red_after FROM health_settings h))),
           COALESCE(g.open_gaps, 0), COALESCE(g.missing_seqs, 0),
           t.code, t.time
    FROM meters m
    LEFT JOIN LATERAL (
        SELECT max(e.last_seen_at) AS last_seen FROM meter_epochs e WHERE e.meter_id = m.meter_id
    ) s ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS open_gaps, sum(g.to_seq - g.from_seq + 1)::bigint AS missing_seqs
        FROM gaps g WHERE g.meter_id = m.meter_id AND g.status IN ('open', 'requested')
    ) g ON true
    LEFT JOIN LATERAL (
        SELECT ev.code, ev.time FROM events ev
        WHERE ev.meter_id = m.meter_id
          AND ev.code IN ('003', '005', '007', '011', '013', '014', '015')
          AND ev.time <= as_of
        ORDER BY ev.time DESC LIMIT 1
    ) t ON true
$$;

-- For Grafana's PostgreSQL data source and for people at a psql prompt.
CREATE OR REPLACE VIEW meter_health AS SELECT * FROM meter_health_at(now());
