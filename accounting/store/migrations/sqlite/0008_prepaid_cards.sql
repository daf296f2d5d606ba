-- Tollgate ledger, schema 8: prepaid cards. The code is secret and stored as
-- its SHA-256 only (80 random bits: a fast hash is enough, nobody can search
-- that space); the serial is printed on the card and is not secret.

CREATE TABLE cards (
    id          INTEGER PRIMARY KEY,
    batch       TEXT NOT NULL,
    serial      TEXT NOT NULL UNIQUE,
    code_sha256 TEXT NOT NULL UNIQUE,
    value       INTEGER NOT NULL CHECK (value > 0),
    currency    TEXT NOT NULL,
    created_ns  INTEGER NOT NULL,
    expires_ns  INTEGER NOT NULL,
    used_ns     INTEGER,
    used_by     INTEGER REFERENCES subscribers(id),
    payment_id  INTEGER REFERENCES payments(id)
);

-- every activation attempt, to limit guessing per subscriber
CREATE TABLE card_attempts (
    id            INTEGER PRIMARY KEY,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    ts_ns         INTEGER NOT NULL,
    ok            INTEGER NOT NULL
);
CREATE INDEX card_attempts_subscriber ON card_attempts(subscriber_id, ts_ns);
