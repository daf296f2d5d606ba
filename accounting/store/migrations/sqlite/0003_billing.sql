-- Tollgate ledger, schema 3: what the billing calendar charges besides
-- traffic (subscription fees, their refunds, postpaid and prevailing-traffic
-- settlements; see accounting/billing.py), and when a subscriber's billing
-- under its current tariff began.

CREATE TABLE postings (
    id            INTEGER PRIMARY KEY,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    kind          TEXT NOT NULL,     -- fee, fee-refund, postpaid, prevailing, prevailing-final
    amount        INTEGER NOT NULL,  -- charged (> 0) or given back (< 0)
    ts_ns         INTEGER NOT NULL,
    key           TEXT NOT NULL UNIQUE,  -- the same period or day twice is recorded once
    detail        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX postings_subscriber ON postings(subscriber_id, ts_ns);

-- NULL: since the subscriber was created (created_ns)
ALTER TABLE subscribers ADD COLUMN billing_since_ns INTEGER;
