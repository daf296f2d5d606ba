-- Tollgate ledger, schema 1.
-- Amounts are integers in the currency's internal unit (nano-units of money,
-- or bytes when accounting in volume). Times ending in _ns are nanoseconds
-- since the epoch (UTC); usage.minute is the epoch second its minute starts.

CREATE TABLE subscribers (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    contract        TEXT,
    tariff          TEXT NOT NULL,
    currency        TEXT NOT NULL,
    opening_balance INTEGER NOT NULL DEFAULT 0,
    balance         INTEGER NOT NULL DEFAULT 0,  -- cache: opening + payments + adjustments - charges
    credit_limit    INTEGER NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    active          INTEGER NOT NULL DEFAULT 1,
    created_ns      INTEGER NOT NULL
);

CREATE TABLE addresses (
    network       TEXT PRIMARY KEY,  -- canonical CIDR
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id)
);
CREATE INDEX addresses_subscriber ON addresses(subscriber_id);

CREATE TABLE payments (
    id              INTEGER PRIMARY KEY,
    subscriber_id   INTEGER NOT NULL REFERENCES subscribers(id),
    amount          INTEGER NOT NULL,
    ts_ns           INTEGER NOT NULL,
    method          TEXT NOT NULL,
    comment         TEXT,
    idempotency_key TEXT UNIQUE
);
CREATE INDEX payments_subscriber ON payments(subscriber_id);

CREATE TABLE adjustments (
    id            INTEGER PRIMARY KEY,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    amount        INTEGER NOT NULL,
    ts_ns         INTEGER NOT NULL,
    reason        TEXT NOT NULL,
    author        TEXT NOT NULL
);

CREATE TABLE flushes (
    id     TEXT PRIMARY KEY,  -- replaying a flush with a known id changes nothing
    ts_ns  INTEGER NOT NULL,
    rows   INTEGER NOT NULL,
    source TEXT NOT NULL
);

CREATE TABLE charges (
    id            INTEGER PRIMARY KEY,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    flush_id      TEXT NOT NULL REFERENCES flushes(id),
    amount        INTEGER NOT NULL,
    ts_ns         INTEGER NOT NULL
);
CREATE INDEX charges_subscriber ON charges(subscriber_id);

CREATE TABLE usage (
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    zone          INTEGER NOT NULL,
    direction     INTEGER NOT NULL,  -- 0 upload, 1 download
    minute        INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    packets       INTEGER NOT NULL,
    amount        INTEGER NOT NULL,
    PRIMARY KEY (subscriber_id, zone, direction, minute)
) WITHOUT ROWID;

CREATE TABLE blocks (
    id            INTEGER PRIMARY KEY,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    kind          TEXT NOT NULL CHECK (kind IN ('block', 'unblock')),
    reason        TEXT NOT NULL,
    ts_ns         INTEGER NOT NULL
);

CREATE TABLE imports (
    digest  TEXT PRIMARY KEY,  -- sha256 of a replayed capture file
    path    TEXT NOT NULL,
    packets INTEGER NOT NULL,
    ts_ns   INTEGER NOT NULL
);
