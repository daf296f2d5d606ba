-- Tollgate ledger, schema 5: tariff changes scheduled for a later time (the
-- next period, a date); the gateway applies each once when it falls due.

CREATE TABLE tariff_changes (
    id            INTEGER PRIMARY KEY,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    tariff        TEXT NOT NULL,
    effective_ns  INTEGER NOT NULL,
    created_ns    INTEGER NOT NULL,
    applied_ns    INTEGER               -- NULL: still to come
);
CREATE INDEX tariff_changes_due ON tariff_changes(effective_ns) WHERE applied_ns IS NULL;
