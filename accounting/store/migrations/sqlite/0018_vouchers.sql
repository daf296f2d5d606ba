-- Tollgate ledger, schema 18: vouchers (issue 15), prepaid cards that make a guest account on first use (hotels,
-- campuses). Not rows of `cards` (schema 8): a card pays its value to an existing subscriber and must have one
-- (value > 0); a voucher may hold a volume and no money, and becomes the account it opens. Codes are kept as
-- their SHA-256 (accounting/prepaid.py, the same alphabet and normalisation as cards).
CREATE TABLE vouchers (
    id            INTEGER PRIMARY KEY,
    batch         TEXT NOT NULL,
    serial        TEXT NOT NULL UNIQUE,
    code_sha256   TEXT NOT NULL UNIQUE,
    value         INTEGER NOT NULL DEFAULT 0 CHECK (value >= 0),   -- internal units: the guest's opening balance
    currency      TEXT NOT NULL,
    volume        INTEGER CHECK (volume > 0),                       -- bytes outside the local zone; NULL: none
    valid_ns      INTEGER NOT NULL CHECK (valid_ns > 0),            -- how long it lasts, from its first use
    devices       INTEGER CHECK (devices > 0),                      -- live portal sessions at once; NULL: any
    tariff        TEXT NOT NULL,
    created_ns    INTEGER NOT NULL,
    expires_ns    INTEGER NOT NULL,                                 -- redeem before this
    first_used_ns INTEGER,
    ends_ns       INTEGER,                                          -- first use + valid_ns
    subscriber_id INTEGER UNIQUE REFERENCES subscribers(id),        -- the guest account made at first use
    CHECK (value > 0 OR volume IS NOT NULL),
    CHECK ((first_used_ns IS NULL) = (subscriber_id IS NULL) AND (first_used_ns IS NULL) = (ends_ns IS NULL))
);

-- redemption attempts by client address, to limit guessing (no account to count them against yet)
CREATE TABLE voucher_attempts (
    id       INTEGER PRIMARY KEY,
    address  TEXT NOT NULL,
    ts_ns    INTEGER NOT NULL,
    ok       INTEGER NOT NULL
);
CREATE INDEX voucher_attempts_address ON voucher_attempts(address, ts_ns);
