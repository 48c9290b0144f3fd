-- Health reads bounded by what they need, not by the fleet's history (100,000 meters
-- with two years of events took 6 s for the view: its tamper lookup probed every 30-day
-- events chunk for every meter without a tamper event).

-- The last tamper event is the last one within red_after of as_of: what `ingestd status`
-- shows and the flag rule's horizon. Bounded in time, the lookup touches only the chunks
-- of that window (TimescaleDB excludes the others at run time). Older tamper events are in
-- `events`, for dashboards and audits.
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
          AND ev.time > as_of - COALESCE(red_after, (SELECT h.red_after FROM health_settings h))
        ORDER BY ev.time DESC LIMIT 1
    ) t ON true
$$;

-- The classifier counts, for each power loss, the site's other meters with a power loss
-- near it: looked up per peer meter by this index, not by scanning every power loss of
-- the fleet in the window.
CREATE INDEX IF NOT EXISTS events_power_loss ON events (meter_id, time) WHERE code = '001';
