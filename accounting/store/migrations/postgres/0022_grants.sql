-- Tollgate ledger, schema 22: credit grants between the ledger and each
-- gateway (RFC 8506 style), and kernel state kept per gateway. See the
-- SQLite file of the same name for the model; here, what differs.
--
-- A grant is taken by one conditional UPDATE of the subscriber's row under
-- READ COMMITTED: concurrent reserves of one subscriber queue on that row
-- lock, and each re-reads the row the previous one committed before taking
-- (PostgreSQL re-evaluates the WHERE of an UPDATE on the newest row version),
-- so two gateways can never take the same money.
ALTER TABLE subscribers ADD COLUMN reserved BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0);
ALTER TABLE subscribers ADD COLUMN last_reserve BIGINT NOT NULL DEFAULT 0;

CREATE TABLE grants (
    gateway        TEXT NOT NULL,
    subscriber_id  BIGINT NOT NULL REFERENCES subscribers(id),
    amount         BIGINT NOT NULL CHECK (amount >= 0),
    valid_until_ns BIGINT NOT NULL,
    PRIMARY KEY (gateway, subscriber_id)
);
CREATE INDEX grants_valid_until ON grants (valid_until_ns);

DROP TRIGGER changes_subscriber_update ON subscribers;
CREATE TRIGGER changes_subscriber_update AFTER UPDATE ON subscribers
    FOR EACH ROW
    WHEN ((NEW.balance IS NOT DISTINCT FROM OLD.balance AND NEW.reserved IS NOT DISTINCT FROM OLD.reserved) OR
          (NEW.name, NEW.tariff, NEW.credit_limit, NEW.active)
              IS DISTINCT FROM (OLD.name, OLD.tariff, OLD.credit_limit, OLD.active))
    EXECUTE FUNCTION changes_subscriber_update();

-- rebuilt rather than altered, so the columns are in the same order as on SQLite
CREATE TABLE kernel_marks_22 (
    gateway       TEXT NOT NULL DEFAULT '',
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    direction     BIGINT NOT NULL CHECK (direction IN (0, 1)),
    bytes         BIGINT NOT NULL,
    packets       BIGINT NOT NULL,
    PRIMARY KEY (gateway, subscriber_id, direction)
);
INSERT INTO kernel_marks_22 SELECT '', subscriber_id, direction, bytes, packets FROM kernel_marks;
DROP TABLE kernel_marks;
ALTER TABLE kernel_marks_22 RENAME TO kernel_marks;
ALTER INDEX kernel_marks_22_pkey RENAME TO kernel_marks_pkey;

CREATE TABLE block_state_22 (
    gateway       TEXT NOT NULL DEFAULT '',
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    blocked       BIGINT NOT NULL,
    payment_id    BIGINT NOT NULL,
    adjustment_id BIGINT NOT NULL,
    ts_ns         BIGINT NOT NULL,
    PRIMARY KEY (gateway, subscriber_id)
);
INSERT INTO block_state_22 SELECT '', subscriber_id, blocked, payment_id, adjustment_id, ts_ns FROM block_state;
DROP TABLE block_state;
ALTER TABLE block_state_22 RENAME TO block_state;
ALTER INDEX block_state_22_pkey RENAME TO block_state_pkey;
