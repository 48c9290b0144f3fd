-- The database's clock bounds what the head-end's can stamp. Safe to run twice.
--
-- A head-end clock a year fast for ten seconds once left meter_epochs.last_seen_at a year
-- ahead, and since last_seen_at only ever grows (GREATEST), it stayed there: the meter
-- was `ok` in meter_health for a year, however long it was silent. The daemon now takes
-- its time from the database (ingestd/clock.py); this function no longer trusts any
-- caller's clock with the one column health depends on.

-- As in 0004, with every time the caller gives capped at now() (the transaction's start;
-- a batch's messages were all received before it). A last_seen_at already in the future
-- comes back to now() at the meter's next message; otherwise it never moves backwards.
CREATE OR REPLACE FUNCTION ingestd_advance_epochs(
    p_meters text[], p_epochs bigint[], p_max_seqs bigint[], p_seen timestamptz[], p_now timestamptz)
RETURNS TABLE (meter_id text, epoch bigint, previous_max bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO meter_epochs (meter_id, epoch, max_seq, first_seen_at, last_seen_at)
    SELECT t.m, t.e, 0, LEAST(p_now, now()), LEAST(p_now, now()) FROM unnest(p_meters, p_epochs) AS t(m, e)
    ON CONFLICT DO NOTHING;

    RETURN QUERY
        SELECT me.meter_id, me.epoch, me.max_seq FROM meter_epochs me
        WHERE (me.meter_id, me.epoch) IN (SELECT * FROM unnest(p_meters, p_epochs))
        ORDER BY me.meter_id, me.epoch
        FOR UPDATE;

    UPDATE meter_epochs AS me
    SET max_seq = GREATEST(me.max_seq, t.max_seq),
        last_seen_at = LEAST(GREATEST(me.last_seen_at, t.seen), now())
    FROM unnest(p_meters, p_epochs, p_max_seqs, p_seen) AS t(m, e, max_seq, seen)
    WHERE me.meter_id = t.m AND me.epoch = t.e;

    UPDATE gaps AS g SET next_request_at = p_now
    WHERE g.meter_id = ANY (p_meters) AND g.status = 'requested' AND g.next_request_at IS NULL;
END;
$$;

-- Repair what a fast clock left behind. A future last_seen_at becomes now(): a meter
-- silent since then turns gray gray_after from now (its true last message is unknown).
UPDATE meter_epochs SET last_seen_at = now() WHERE last_seen_at > now();
UPDATE meter_epochs SET first_seen_at = now() WHERE first_seen_at > now();
-- A gap stamped from the future would be asked for a year late: due now instead (the
-- requester then backs off from its attempts as usual). (Not LEAST(): it skips NULLs.)
UPDATE gaps
SET next_request_at = CASE
        WHEN status IN ('open', 'requested') AND next_request_at > now() THEN now()
        ELSE next_request_at
    END,
    detected_at = CASE WHEN detected_at > now() THEN now() ELSE detected_at END,
    last_request_at = CASE WHEN last_request_at > now() THEN now() ELSE last_request_at END,
    closed_at = CASE WHEN closed_at > now() THEN now() ELSE closed_at END
WHERE detected_at > now() OR last_request_at > now() OR closed_at > now();
