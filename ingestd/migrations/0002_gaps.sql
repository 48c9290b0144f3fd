-- Sequence tracking and gaps (backfill from the meters' flash). Safe to run twice.

-- Per (meter, epoch): the highest seq seen and when the meter was last heard from
-- (any valid message, duplicates included). Updated in the batch transaction.
CREATE TABLE IF NOT EXISTS meter_epochs (
    meter_id      text NOT NULL,
    epoch         bigint NOT NULL,
    max_seq       bigint NOT NULL,
    first_seen_at timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL,
    PRIMARY KEY (meter_id, epoch)
);
CREATE INDEX IF NOT EXISTS meter_epochs_last_seen ON meter_epochs (meter_id, last_seen_at DESC);

-- A range of seqs missing from one (meter, epoch). `open`: detected, waiting out the grace
-- period; `requested`: a replay was asked for; `filled`: every seq arrived; `lost`: the
-- meter no longer has them (event 010) or they are older than its flash retention.
-- A gap that fills in part is shrunk or split; the rows of a split keep `detected_at`.
CREATE TABLE IF NOT EXISTS gaps (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    meter_id        text NOT NULL,
    epoch           bigint NOT NULL,
    from_seq        bigint NOT NULL,
    to_seq          bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('open', 'requested', 'filled', 'lost')),
    detected_at     timestamptz NOT NULL,
    last_request_at timestamptz,
    -- When to ask (again); NULL while waiting to hear from an unresponsive meter.
    next_request_at timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    request_id      uuid,
    closed_at       timestamptz,
    CHECK (from_seq >= 1 AND to_seq >= from_seq),
    CHECK ((status IN ('filled', 'lost')) = (closed_at IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS gaps_due ON gaps (next_request_at) WHERE status IN ('open', 'requested');
CREATE INDEX IF NOT EXISTS gaps_active ON gaps (meter_id, epoch, from_seq) WHERE status IN ('open', 'requested');
CREATE INDEX IF NOT EXISTS gaps_closed ON gaps (closed_at) WHERE closed_at IS NOT NULL;
