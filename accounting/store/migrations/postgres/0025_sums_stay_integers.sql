-- Tollgate ledger, schema 25: a sum past 2^63-1 is refused, not stored as a float.
-- On SQLite, integer + integer beyond 64 bits becomes a REAL without an error, and triggers there
-- refuse it. PostgreSQL's bigint arithmetic refuses it already ("bigint out of range"), which the
-- ledger turns into a LedgerError with nothing written. Nothing to create here; the version keeps
-- both backends' numbers equal.
SELECT 1;
