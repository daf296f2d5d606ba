-- Tollgate ledger, schema 16: rollups (issue 12, accounting/rollup.py).
--
-- Usage and charges are rolled up: minute rows older than a recent window
-- become one row per local hour, hourly rows older than a longer window one
-- row per local day, and one flush's charges likewise (per subscriber per
-- hour, then per day), every sum kept to the byte and the nano-unit. Local
-- hours and days are those of the time zone recorded in rollup_state, the
-- one whose midnights start the billing periods, so invoices stay exact.

-- usage.minute is now the start (epoch second) of the row's bucket and span
-- its length in seconds: 60 for a minute row, a local hour (3600, or what a
-- DST change or a :30 offset leaves of it; never more than 7200) or a local
-- day (23, 24 or 25 hours; always more than 7200). Buckets never overlap: a
-- bucket start is unique per subscriber, zone and direction (the key).
ALTER TABLE usage ADD COLUMN span INTEGER NOT NULL DEFAULT 60 CHECK (span >= 60 AND span % 60 = 0);

-- the rollup's work, per subscriber, found without reading the years of daily rows
CREATE INDEX usage_fine ON usage (subscriber_id, minute) WHERE span = 60;
CREATE INDEX usage_hourly ON usage (subscriber_id, minute) WHERE span > 60 AND span <= 7200;

-- charges: a row is one flush's charge (flush_id set, span_ns 0, at ts_ns)
-- or the total of flush_count such charges in the bucket [ts_ns, ts_ns +
-- span_ns) (flush_id NULL). SQLite cannot drop a NOT NULL, so the table is
-- made again; ids are kept. Nothing refers to charges.
CREATE TABLE charges_new (
    id            INTEGER PRIMARY KEY,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    flush_id      TEXT REFERENCES flushes(id),
    amount        INTEGER NOT NULL,
    ts_ns         INTEGER NOT NULL,
    span_ns       INTEGER NOT NULL DEFAULT 0 CHECK (span_ns >= 0),
    flush_count   INTEGER NOT NULL DEFAULT 1 CHECK (flush_count >= 1),
    CHECK ((flush_id IS NULL) = (span_ns > 0))
);
INSERT INTO charges_new (id, subscriber_id, flush_id, amount, ts_ns)
    SELECT id, subscriber_id, flush_id, amount, ts_ns FROM charges;
DROP TABLE charges;
ALTER TABLE charges_new RENAME TO charges;
-- (subscriber, span_ns, ts_ns): a subscriber's sums, its one-flush charges by time (span_ns 0) for the rollup
CREATE INDEX charges_subscriber ON charges (subscriber_id, span_ns, ts_ns);
CREATE INDEX charges_flush ON charges (flush_id);

-- What has been rolled up, for readers: before day_cutoff the ledger may hold
-- days, before hour_cutoff hours (epoch seconds; both only grow, and are set
-- before any row is rolled, so a reader never sees a coarser row than they
-- say). The time zone is fixed by the first rollup: buckets of another zone
-- would cut through these.
CREATE TABLE rollup_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    timezone    TEXT NOT NULL,
    hour_cutoff INTEGER NOT NULL,
    day_cutoff  INTEGER NOT NULL CHECK (day_cutoff <= hour_cutoff)
);

-- Flushes pruned, per boot: every id "<boot>:<seq>" with seq <= pruned_seq
-- counts as applied (a gateway applies its flushes in seq order and retries
-- only its one pending flush, whose seq is above all it has applied).
CREATE TABLE flush_watermarks (
    boot       TEXT PRIMARY KEY,
    pruned_seq INTEGER NOT NULL CHECK (pruned_seq >= 0)
) WITHOUT ROWID;

-- a flush named by a spool file is kept (the file's record refers to it): found by this index
CREATE INDEX ingested_files_flush ON ingested_files (flush_id);
