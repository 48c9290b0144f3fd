-- The batch transaction's sequence tracking in one round trip, and cheaper to update.
-- Safe to run twice.

-- Every batch updates last_seen_at of each (meter, epoch) it touches. An index on that
-- column makes each update write new entries in every index of the table; without it,
-- and with room left on each page, the update is HOT (heap only). The health queries
-- read the table by meter through its primary key, or whole, and need no such index.
DROP INDEX IF EXISTS meter_epochs_last_seen;
ALTER TABLE meter_epochs SET (fillfactor = 70);

-- What gaps.track_seqs did in four statements, in order, with one call:
-- 1. a placeholder row for every (meter, epoch) not seen before, so that two instances
--    seeing a new epoch at once serialise on it instead of both opening a gap from seq 1;
-- 2. lock the rows in (meter, epoch) order, the same order in every instance (no
--    deadlocks between instances), and return each one's high-water mark before this batch;
-- 3. advance the high-water marks and last-seen times;
-- 4. wake the gaps of these meters that were waiting to hear from them (requested, with
--    no next request time: the meter had not answered).
-- Each statement takes a fresh snapshot (READ COMMITTED), as the four did.
CREATE OR REPLACE FUNCTION ingestd_advance_epochs(
    p_meters text[], p_epochs bigint[], p_max_seqs bigint[], p_seen timestamptz[], p_now timestamptz)
RETURNS TABLE (meter_id text, epoch bigint, previous_max bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO meter_epochs (meter_id, epoch, max_seq, first_seen_at, last_seen_at)
    SELECT t.m, t.e, 0, p_now, p_now FROM unnest(p_meters, p_epochs) AS t(m, e)
    ON CONFLICT DO NOTHING;

    RETURN QUERY
        SELECT me.meter_id, me.epoch, me.max_seq FROM meter_epochs me
        WHERE (me.meter_id, me.epoch) IN (SELECT * FROM unnest(p_meters, p_epochs))
        ORDER BY me.meter_id, me.epoch
        FOR UPDATE;

    UPDATE meter_epochs AS me
    SET max_seq = GREATEST(me.max_seq, t.max_seq), last_seen_at = GREATEST(me.last_seen_at, t.seen)
    FROM unnest(p_meters, p_epochs, p_max_seqs, p_seen) AS t(m, e, max_seq, seen)
    WHERE me.meter_id = t.m AND me.epoch = t.e;

    UPDATE gaps AS g SET next_request_at = p_now
    WHERE g.meter_id = ANY (p_meters) AND g.status = 'requested' AND g.next_request_at IS NULL;
END;
$$;
