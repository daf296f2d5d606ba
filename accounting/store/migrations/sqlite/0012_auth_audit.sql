-- Tollgate ledger, schema 12: who may use the admin API and the portal, and
-- what they changed (see api/auth.py and accounting/audit.py).

-- Bearer tokens of the admin API. Only the SHA-256 of a token is kept: it is
-- 256 random bits, so a fast hash is enough and a stolen ledger gives no
-- usable token. A revoked token stays, so its name is not reused and the
-- audit rows that name it still mean the same one.
CREATE TABLE api_tokens (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    role       TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'cashier')),
    digest     TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL,
    revoked_ns INTEGER                -- NULL: in force
) STRICT;

-- A subscriber's portal password, as scrypt$N$r$p$<salt b64>$<key b64>.
CREATE TABLE portal_passwords (
    subscriber_id INTEGER PRIMARY KEY REFERENCES subscribers (id),
    hash          TEXT NOT NULL,
    changed_ns    INTEGER NOT NULL
) STRICT;

-- Every change made through the API or the CLI, as a hash chain: each row's
-- hash covers the previous row's hash and its own content, so a row edited
-- or deleted after the fact breaks the chain at that point. before and after
-- are JSON with secrets redacted.
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY,
    ts_ns     INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    before    TEXT CHECK (before IS NULL OR json_valid(before)),
    after     TEXT CHECK (after IS NULL OR json_valid(after)),
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
) STRICT;

-- Keys the gateway makes for itself on first use (the session-signing key).
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;
