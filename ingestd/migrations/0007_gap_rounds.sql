-- Indexes for the replay request round (ingestd/gaps.py, GapRequester). Safe to run twice.

-- A round takes a few due gaps of each meter in turn and counts each meter's
-- unanswered requests. With one index per status, keyed by meter, each of those is a
-- short index range however many gaps one meter has (a stolen key can give its meter
-- thousands); the meters with open gaps are found by skipping from one meter_id to the
-- next. The requested index also serves the wake-up of a meter's waiting gaps when it
-- speaks (ingestd_advance_epochs).
CREATE INDEX IF NOT EXISTS gaps_open_due ON gaps (meter_id, next_request_at) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS gaps_requested_due ON gaps (meter_id, next_request_at) WHERE status = 'requested';

-- The round no longer takes gaps in plain due order: that order let one meter's thousands
-- of gaps go before every other meter's. Nothing else reads this index, and every update
-- of a gap's next request time had to maintain it.
DROP INDEX IF EXISTS gaps_due;
