-- Tollgate ledger, schema 24: one owner per address, held by the database.
-- On PostgreSQL an exclusion constraint refuses a prefix that overlaps another subscriber's, since
-- writers run side by side there. SQLite cannot compare prefixes in a constraint, and needs none:
-- its one writer at a time runs accounting/operations.py's check and the insert with no other
-- writer between them. Nothing to create here; the version keeps both backends' numbers equal.
SELECT 1;
