-- Tollgate ledger, schema 22: credit grants between the ledger and each
-- gateway (RFC 8506 style), and kernel state kept per gateway.
--
-- A gateway that shares the ledger never spends a subscriber's balance
-- directly: it reserves a grant (a slice of balance + credit), rates and
-- enforces against it per packet, and its flushes charge the grant. The rule
-- the database holds: the grants outstanding of a subscriber (``reserved``,
-- the sum of its ``grants.amount``) never exceed what balance + credit can
-- pay at the moment each is taken, because a grant is taken by one
-- conditional UPDATE of the subscriber's row (accounting/ledger.py,
-- Ledger.reserve): no read-then-write, no global lock.
ALTER TABLE subscribers ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0);
-- what the last conditional UPDATE took, read back by its RETURNING (which sees new values only)
ALTER TABLE subscribers ADD COLUMN last_reserve INTEGER NOT NULL DEFAULT 0;

CREATE TABLE grants (
    gateway        TEXT NOT NULL,
    subscriber_id  INTEGER NOT NULL REFERENCES subscribers(id),
    amount         INTEGER NOT NULL CHECK (amount >= 0),  -- reserved and not yet charged
    valid_until_ns INTEGER NOT NULL,                       -- then it returns to the balance
    PRIMARY KEY (gateway, subscriber_id)
) STRICT;
CREATE INDEX grants_valid_until ON grants (valid_until_ns);

-- A grant moves ``reserved`` (with the balance at each flush, or alone): not a change of the
-- subscriber for the change feed (schema 14), which would refresh it on every gateway each time.
DROP TRIGGER changes_subscriber_update;
CREATE TRIGGER changes_subscriber_update AFTER UPDATE ON subscribers
WHEN (NEW.balance IS OLD.balance AND NEW.reserved IS OLD.reserved) OR
     (NEW.name, NEW.tariff, NEW.credit_limit, NEW.active) IS NOT (OLD.name, OLD.tariff, OLD.credit_limit, OLD.active)
BEGIN INSERT INTO changes (subscriber_id, what) VALUES (NEW.id, 'subscriber'); END;

-- Each gateway has its own kernel and its own counters: their marks (schema 13) and the block
-- state it restores at start are its own. '' is the gateway of a ledger that has only one.
CREATE TABLE kernel_marks_22 (
    gateway       TEXT NOT NULL DEFAULT '',
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    direction     INTEGER NOT NULL CHECK (direction IN (0, 1)),
    bytes         INTEGER NOT NULL,
    packets       INTEGER NOT NULL,
    PRIMARY KEY (gateway, subscriber_id, direction)
) WITHOUT ROWID;
INSERT INTO kernel_marks_22 SELECT '', subscriber_id, direction, bytes, packets FROM kernel_marks;
DROP TABLE kernel_marks;
ALTER TABLE kernel_marks_22 RENAME TO kernel_marks;

CREATE TABLE block_state_22 (
    gateway       TEXT NOT NULL DEFAULT '',
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    blocked       INTEGER NOT NULL,
    payment_id    INTEGER NOT NULL,
    adjustment_id INTEGER NOT NULL,
    ts_ns         INTEGER NOT NULL,
    PRIMARY KEY (gateway, subscriber_id)
);
INSERT INTO block_state_22 SELECT '', subscriber_id, blocked, payment_id, adjustment_id, ts_ns FROM block_state;
DROP TABLE block_state;
ALTER TABLE block_state_22 RENAME TO block_state;
