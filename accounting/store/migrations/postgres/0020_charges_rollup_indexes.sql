-- Tollgate ledger, schema 20 (PostgreSQL 15; migrations/sqlite/0020_charges_rollup_indexes.sql):
-- the rollup finds whose charges to roll by scanning only the charges finer
-- than its levels (one-flush charges, then hourly totals), as usage_fine and
-- usage_hourly serve usage (schema 16), instead of asking every subscriber in
-- turn (a million subscribers: 95 s of queries each hour, most of them inside
-- the rollup's write transactions).
CREATE INDEX charges_fine ON charges (subscriber_id, ts_ns) WHERE span_ns = 0;
CREATE INDEX charges_hourly ON charges (subscriber_id, ts_ns) WHERE span_ns > 0 AND span_ns <= 7200000000000;
