-- Tollgate ledger, schema 1 (PostgreSQL 15): the translation of
-- migrations/sqlite/0001_initial.sql. Same tables, columns in the same order,
-- same keys and indexes; every integer is a bigint (amounts are nano-units and
-- times nanoseconds: they pass 2^31, some reach 2^63 - 1). An SQLite
-- `INTEGER PRIMARY KEY` is an identity column BY DEFAULT (code may insert
-- explicit ids: the bulk import numbers subscribers itself), except the ids
-- that readers follow as "id > last seen" (payments, adjustments here, the
-- change feed in schema 14): those are commit-ordered, see feed_head below.
--
-- Amounts are integers in the currency's internal unit (nano-units of money,
-- or bytes when accounting in volume). Times ending in _ns are nanoseconds
-- since the epoch (UTC); usage.minute is the epoch second its minute starts.

-- Commit-ordered ids (PostgreSQL only). SQLite has one writer at a time, so an
-- id taken in a transaction is above every id of the transactions committed
-- before it and below every id of the ones after it: a gateway that reads
-- "payments WHERE id > last seen" (Ledger.balance_changes_since, the top-ups
-- that reach its live balances) misses nothing. A PostgreSQL identity or
-- sequence is not like that: ids are taken at insert and become visible at
-- commit, so id 8 can be visible before id 7, and a reader that has moved past
-- 8 never sees 7 (a payment that never reaches the engine).
--
-- So these ids are taken under the lock of the one row of feed_head, held to
-- the end of the writing transaction: the trigger below locks the row
-- (SELECT ... FOR UPDATE) and only then takes the id from the table's
-- sequence. A second writer waits for the lock until the first has committed
-- (or rolled back), so every id it takes is above all of the first's, and the
-- first's are visible by the time the second can take one: ids become visible
-- in order and "id > last seen" misses nothing. The older credit store's feed (retired)
-- did the same with `UPDATE feed_head SET last = last + 1 RETURNING last`;
-- here the lock is a FOR UPDATE and the number a sequence, because these ids
-- come from row triggers and a bulk import writes a million of them in one
-- transaction: a million updates of one row in one transaction leave a chain
-- of a million versions that each next update walks (quadratic: 20k rows took
-- 3.3 s against 0.6 s), while a row lock the transaction already holds costs
-- nothing to take again. The id is always assigned here, whatever the INSERT
-- says (no code inserts these ids explicitly): commit order is the point.
-- Writers of these tables queue on the one row, as all writers do in SQLite;
-- the flush (charges, usage, the balance cache) never takes it.
--
-- Lock order. A change of a subscriber writes the feed from a trigger after
-- its UPDATE: it holds the subscriber's row, then takes the head. A payment or
-- an adjustment is inserted before its UPDATE of the balance: it would take the
-- head, then the row, and the two would deadlock on the same subscriber. So
-- for payments and adjustments (the second argument) the trigger takes the
-- subscriber's row first (FOR NO KEY UPDATE: what the balance UPDATE takes
-- anyway, which does not wait for inserts that merely refer to the row), then
-- the head: the same order in both. (A transaction that writes the feed for
-- one subscriber and then updates another's row can still deadlock with a
-- payment of the second; PostgreSQL then aborts one of them, to be retried.)
CREATE TABLE feed_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one)
);
INSERT INTO feed_head VALUES (true);

CREATE FUNCTION feed_commit_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_NARGS > 1 THEN                     -- 'subscriber': its row before the head (lock order above)
        PERFORM 1 FROM subscribers WHERE id = NEW.subscriber_id FOR NO KEY UPDATE;
    END IF;
    PERFORM 1 FROM feed_head FOR UPDATE;     -- held until this transaction ends
    NEW.id := nextval(TG_ARGV[0]::regclass); -- so taken after every earlier writer's commit
    RETURN NEW;
END
$$;

-- An explicit id above the identity's sequence (the bulk import numbers its
-- subscribers from max(id) + 1 itself) moves the sequence past it, as SQLite
-- picks max(rowid) + 1 for the next row without an id: otherwise the next
-- add_subscriber after an import would take an id the import used. setval is
-- not transactional: a rolled-back import leaves a gap, never a collision.
-- A row trigger whose WHEN tests the sequence: a row with an id from the
-- sequence queues nothing; a row of an import costs one setval (about 25 us,
-- measured at 20k rows; a statement trigger over the inserted rows costs 45 us
-- a row when they come one INSERT each, as executemany sends them).
CREATE FUNCTION follow_explicit_ids() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM setval(TG_ARGV[0]::regclass, NEW.id)
        WHERE NEW.id > coalesce(pg_sequence_last_value(TG_ARGV[0]::regclass), 0);
    RETURN NULL;
END
$$;

CREATE TABLE subscribers (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    contract        TEXT,
    tariff          TEXT NOT NULL,
    currency        TEXT NOT NULL,
    opening_balance BIGINT NOT NULL DEFAULT 0,
    balance         BIGINT NOT NULL DEFAULT 0,  -- cache: opening + payments + adjustments - charges
    credit_limit    BIGINT NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    active          BIGINT NOT NULL DEFAULT 1,
    created_ns      BIGINT NOT NULL
);
CREATE TRIGGER subscribers_follow_ids AFTER INSERT ON subscribers
    FOR EACH ROW WHEN (NEW.id > coalesce(pg_sequence_last_value('subscribers_id_seq'), 0))
    EXECUTE FUNCTION follow_explicit_ids('subscribers_id_seq');

CREATE TABLE addresses (
    network       TEXT PRIMARY KEY,  -- canonical CIDR
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id)
);
CREATE INDEX addresses_subscriber ON addresses(subscriber_id);

-- id: commit-ordered (feed_head above), read as "id > last seen" by the gateway
CREATE TABLE payments (
    id              BIGINT PRIMARY KEY,
    subscriber_id   BIGINT NOT NULL REFERENCES subscribers(id),
    amount          BIGINT NOT NULL,
    ts_ns           BIGINT NOT NULL,
    method          TEXT NOT NULL,
    comment         TEXT,
    idempotency_key TEXT UNIQUE
);
CREATE SEQUENCE payments_id_seq AS bigint CACHE 1 OWNED BY payments.id;  -- CACHE 1: a session caching ids would hand them out of order
CREATE TRIGGER payments_commit_order BEFORE INSERT ON payments
    FOR EACH ROW EXECUTE FUNCTION feed_commit_order('payments_id_seq', 'subscriber');
CREATE INDEX payments_subscriber ON payments(subscriber_id);

-- id: commit-ordered, like payments
CREATE TABLE adjustments (
    id            BIGINT PRIMARY KEY,
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    amount        BIGINT NOT NULL,
    ts_ns         BIGINT NOT NULL,
    reason        TEXT NOT NULL,
    author        TEXT NOT NULL
);
CREATE SEQUENCE adjustments_id_seq AS bigint CACHE 1 OWNED BY adjustments.id;
CREATE TRIGGER adjustments_commit_order BEFORE INSERT ON adjustments
    FOR EACH ROW EXECUTE FUNCTION feed_commit_order('adjustments_id_seq', 'subscriber');

CREATE TABLE flushes (
    id     TEXT PRIMARY KEY,  -- replaying a flush with a known id changes nothing
    ts_ns  BIGINT NOT NULL,
    rows   BIGINT NOT NULL,
    source TEXT NOT NULL
);

CREATE TABLE charges (
    id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    flush_id      TEXT NOT NULL REFERENCES flushes(id),
    amount        BIGINT NOT NULL,
    ts_ns         BIGINT NOT NULL
);
CREATE INDEX charges_subscriber ON charges(subscriber_id);

-- WITHOUT ROWID in SQLite: a plain table here (PostgreSQL has no rowid)
CREATE TABLE usage (
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    zone          BIGINT NOT NULL,
    direction     BIGINT NOT NULL,  -- 0 upload, 1 download
    minute        BIGINT NOT NULL,
    bytes         BIGINT NOT NULL,
    packets       BIGINT NOT NULL,
    amount        BIGINT NOT NULL,
    PRIMARY KEY (subscriber_id, zone, direction, minute)
);

CREATE TABLE blocks (
    id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    kind          TEXT NOT NULL CHECK (kind IN ('block', 'unblock')),
    reason        TEXT NOT NULL,
    ts_ns         BIGINT NOT NULL
);

CREATE TABLE imports (
    digest  TEXT PRIMARY KEY,  -- sha256 of a replayed capture file
    path    TEXT NOT NULL,
    packets BIGINT NOT NULL,
    ts_ns   BIGINT NOT NULL
);
