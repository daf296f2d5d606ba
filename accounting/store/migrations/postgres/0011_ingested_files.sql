-- Tollgate ledger, schema 11 (PostgreSQL 15; migrations/sqlite/0011_ingested_files.sql):
-- flow files taken from a spool directory (gateway/sources/spool.py). A file
-- is recorded in the same transaction as the flush that holds its traffic, so
-- after a crash it is either charged and recorded, or neither: it is rated
-- again, never twice. Keyed by the SHA-256 of its content: the same file
-- dropped twice is charged once.

-- STRICT in SQLite: every PostgreSQL table is
CREATE TABLE ingested_files (
    digest   TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    flush_id TEXT NOT NULL REFERENCES flushes (id),
    records  BIGINT NOT NULL CHECK (records >= 0),
    bytes    BIGINT NOT NULL CHECK (bytes >= 0)
);
