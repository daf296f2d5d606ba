-- Tollgate ledger, schema 2: the tariffs and zones that usage refers to,
-- more about each block, and indexes for reports by time.

-- Every version of a tariff that was ever in force, so an old charge can be
-- explained by the prices of its day. spec is the tariff as JSON.
CREATE TABLE tariffs (
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 1),
    spec       TEXT NOT NULL CHECK (json_valid(spec)),
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);

-- usage.zone is the engine's zone number; this names it. No foreign key from
-- usage: a replay may write usage before anyone registered the zone names.
CREATE TABLE zones (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

-- What caused a block: the timestamp of the packet that crossed the limit and
-- the engine's balance right after it (both NULL when not known, e.g. manual).
ALTER TABLE blocks ADD COLUMN packet_ts_ns INTEGER;
ALTER TABLE blocks ADD COLUMN balance INTEGER;
CREATE INDEX blocks_subscriber ON blocks(subscriber_id, ts_ns);

CREATE INDEX usage_minute ON usage(minute);
CREATE INDEX charges_flush ON charges(flush_id);
CREATE INDEX adjustments_subscriber ON adjustments(subscriber_id);
