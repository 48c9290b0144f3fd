-- Every event a meter signed is a row of its own (issue 11).
--
-- Up to 0004 an event was identified by (meter, time, code, epoch, seq): two events of one
-- message with the same t and code were one row, and the second was dropped without a
-- trace although its message had been accepted. An event is now identified by its place
-- in the signed message: (meter, epoch, seq, idx), idx being its 0-based position in the
-- body's `events` array. TimescaleDB requires the time column in every unique index of a
-- hypertable, so time is in the index too.
--
-- Existing rows get their position from the signed bytes kept in raw_messages, and the
-- events the old identity dropped are restored from the same bytes: they were signed and
-- accepted, so they belong in `events`. Set-based statements throughout, no loop over rows:
-- 190,000 events of 100,000 messages took 60 s on a busy 2-core test host.

-- Just-in-time compilation of plans that span every chunk costs more than the work itself
-- (8 of the 9 s that reading the signed copies of 40,000 stored messages took). For this
-- transaction only.
SET LOCAL jit = off;

-- TimescaleDB refuses a unique index on a hypertable with compression enabled, and every
-- row is rewritten here anyway. The timescale-licensed edition therefore has compression
-- switched off for this migration (each compressed chunk of events decompressed first) and
-- back on at the end, with idx in the order; its policy compresses the old chunks again.
DO $$
BEGIN
    IF EXISTS (SELECT FROM timescaledb_information.hypertables h
               WHERE format('%I.%I', h.hypertable_schema, h.hypertable_name)::regclass = 'events'::regclass
                 AND h.compression_enabled) THEN
        PERFORM set_config('ingestd.events_compressed', 'on', true);
        PERFORM remove_compression_policy('events', if_exists => TRUE);
        PERFORM decompress_chunk(c, if_not_compressed => TRUE) FROM show_chunks('events') c;
        ALTER TABLE events SET (timescaledb.compress = false);
    END IF;
END;
$$;

-- A negative idx: position unknown. A constant default costs no rewrite and no validating
-- scan; every row is set below.
ALTER TABLE events ADD COLUMN idx integer NOT NULL DEFAULT -1;
DROP INDEX events_identity;

-- The `events` array of an accepted message's signed body, read from its stored bytes (a
-- flattened JWS whose `payload` is the body in base64url without padding); NULL when the
-- database cannot read it, so that one odd message cannot stop the upgrade. The daemon
-- accepted only bodies that are strict UTF-8 JSON without \u0000, which jsonb reads.
CREATE FUNCTION pg_temp.ingestd_signed_events(payload bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    body64 text;
    events jsonb;
BEGIN
    body64 := convert_from(payload, 'UTF8')::jsonb ->> 'payload';
    -- replace() and repeat(), not translate() and rpad(): a third of the cost.
    events := convert_from(decode(replace(replace(body64, '-', '+'), '_', '/')
                                  || repeat('=', (4 - length(body64) % 4) % 4), 'base64'),
                           'UTF8')::jsonb -> 'events';
    RETURN CASE WHEN jsonb_typeof(events) = 'array' THEN events END;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END;
$$;

-- An event's `t` as the daemon read it (ingestd.envelope.parse_time): RFC 3339 with an
-- offset, a fraction truncated (not rounded, as a cast would) to microseconds. NULL when
-- it does not read.
CREATE FUNCTION pg_temp.ingestd_event_time(t text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN regexp_replace(upper(t), '(\.[0-9]{6})[0-9]+', '\1')::timestamptz;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END;
$$;

-- Every event of every stored message that has event rows (a message with events always
-- has one: the old identity kept the first event of each time and code).
CREATE TEMP TABLE signed_events ON COMMIT DROP AS
SELECT s.*,
       -- The old INSERT ... ON CONFLICT DO NOTHING took a message's events in order, so it
       -- kept the first of each (time, code) and dropped the others.
       row_number() OVER (PARTITION BY s.meter_id, s.epoch, s.seq, s.time, s.code ORDER BY s.idx) = 1 AS kept
FROM (
    SELECT r.meter_id, r.epoch, r.seq, r.received_at,
           (e.ord - 1)::integer AS idx,
           pg_temp.ingestd_event_time(e.value ->> 't') AS time,
           e.value ->> 'code' AS code,
           COALESCE(e.value -> 'detail', '{}'::jsonb) AS detail
    -- One raw copy per message: the ledger admits a message once, and only then is its
    -- copy written.
    FROM raw_messages r
    -- An unreadable body gives one row with a NULL idx, counted below.
    LEFT JOIN LATERAL jsonb_array_elements(pg_temp.ingestd_signed_events(r.payload))
        WITH ORDINALITY AS e(value, ord) ON true
    WHERE (r.meter_id, r.epoch, r.seq) IN (SELECT meter_id, epoch, seq FROM events)
) s;
ANALYZE signed_events;

DO $$
DECLARE
    unplaced bigint;
    restored bigint;
    unreadable bigint;
BEGIN
    -- Each stored row is the kept event of its (time, code). A row matching no event of a
    -- signed body (its raw message gone past a retention, or unreadable) cannot be placed:
    -- it gets -1, -2, ... within its message, which no position can take.
    WITH placed AS (
        UPDATE events e SET idx = v.idx
        FROM (
            SELECT e.meter_id, e.epoch, e.seq, e.time, e.code,
                   COALESCE(s.idx, -(row_number() OVER (PARTITION BY e.meter_id, e.epoch, e.seq, s.idx IS NULL
                                                        ORDER BY e.time, e.code))::integer) AS idx
            FROM events e
            LEFT JOIN signed_events s
                ON s.kept
               AND (s.meter_id, s.epoch, s.seq, s.time, s.code) = (e.meter_id, e.epoch, e.seq, e.time, e.code)
        ) v
        -- Still unique here: the old identity.
        WHERE (e.meter_id, e.epoch, e.seq, e.time, e.code) = (v.meter_id, v.epoch, v.seq, v.time, v.code)
        RETURNING e.idx
    )
    SELECT count(*) FILTER (WHERE idx < 0) INTO unplaced FROM placed;

    CREATE UNIQUE INDEX events_identity ON events (meter_id, epoch, seq, idx, time);

    -- The signed events not stored, those the old identity dropped: an event that is a row
    -- already has the same identity, and the conflict skips it. What the daemon would have
    -- refused cannot be in an accepted body; should the database read one otherwise, its
    -- events are not guessed at.
    INSERT INTO events (meter_id, time, code, detail, epoch, seq, idx, received_at)
    SELECT meter_id, time, code, detail, epoch, seq, idx, received_at
    FROM signed_events
    WHERE time IS NOT NULL AND code ~ '^[0-9]{3}$' AND jsonb_typeof(detail) = 'object'
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS restored = ROW_COUNT;

    SELECT count(*) INTO unreadable FROM signed_events WHERE idx IS NULL;
    RAISE NOTICE 'events: % restored from raw_messages, % without a position (idx < 0), '
                 '% stored messages unreadable', restored, unplaced, unreadable;
END;
$$;

-- A daemon older than this migration, running until it is restarted, does not name the
-- position. Without a default its batches would fail, and the messages with events be
-- quarantined; with a constant one, its events of one instant would collide. Each such
-- row gets a negative number of its own instead (only these inserts draw from it).
CREATE SEQUENCE events_unknown_idx AS integer;
ALTER TABLE events ALTER COLUMN idx SET DEFAULT -nextval('events_unknown_idx')::integer;

DROP FUNCTION pg_temp.ingestd_signed_events(bytea);
DROP FUNCTION pg_temp.ingestd_event_time(text);

DO $$
BEGIN
    IF current_setting('ingestd.events_compressed', true) = 'on' THEN
        ALTER TABLE events SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'meter_id',
            timescaledb.compress_orderby = 'time, epoch, seq, idx');
        PERFORM add_compression_policy('events', INTERVAL '100 days', if_not_exists => TRUE);
    END IF;
END;
$$;
