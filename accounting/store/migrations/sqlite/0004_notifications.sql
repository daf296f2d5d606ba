-- Tollgate ledger, schema 4: the outbox of notifications (warnings, blocks,
-- quota levels) for the operator's webhook and/or command; see
-- accounting/notify.py. A key is queued once; delivery is retried with
-- backoff until it succeeds or the attempts run out.

CREATE TABLE notifications (
    id            INTEGER PRIMARY KEY,
    key           TEXT NOT NULL UNIQUE,  -- the same event queued twice is one notification
    subscriber_id INTEGER REFERENCES subscribers(id),
    event         TEXT NOT NULL,         -- warn, block, unblock, quota
    payload       TEXT NOT NULL CHECK (json_valid(payload)),
    created_ns    INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_try_ns   INTEGER NOT NULL,
    delivered_ns  INTEGER,               -- NULL: not yet
    failed_ns     INTEGER,               -- the attempts ran out
    last_error    TEXT
);
CREATE INDEX notifications_due ON notifications(next_try_ns) WHERE delivered_ns IS NULL AND failed_ns IS NULL;
